"""What a data set looks like to the network, and the one way raw events become its input.

``DataSpec`` travels with a trained model (checkpoint JSON, export metadata), so inference
code can bin a new recording exactly as training did, with ``frames_from_events``.

Binning (``spec.binning``, JSON-ready):

- ``by``: ``"time"`` (T equal time bins over the recording) or ``"count"`` (T equal event
  counts), see ``tmkt.data.binning.to_frames``;
- ``binary``: frames hold 1 where a pixel fired in the bin instead of the count;
- ``shift_to_origin``: subtract the smallest x and y first (tonic does this for
  N-Caltech101, whose recordings sit at different places on the 240x180 sensor);
- ``resize``: how the sensor becomes ``input_size``. ``"events"`` (the default for new
  data specs): event coordinates are scaled into ``input_size`` before binning, so frames hold
  integer counts and binary frames are exactly binary, the very spikes a chip is fed (docs/loihi.md);
  ``"frames"``: bin at sensor size, then resize the frames bilinearly (fractional values; what
  every spec written before this key existed did, so ``from_dict`` restores it for them).

Events outside ``sensor_size`` (after the shift) are dropped. Nothing is clipped or normalized:
the network sees the frames as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tmkt.data.binning import MAX_FRAME_BYTES, bin_events
from tmkt.errors import TmktError

DEFAULT_BINNING = {"by": "time", "binary": False, "shift_to_origin": False, "resize": "events"}
LEGACY_RESIZE = "frames"  # specs stored before the "resize" key existed resized frames
# Limits that keep a spec (possibly read from a damaged or hostile config.json) from asking for
# frames that cannot fit in memory: T, and the float32 elements of one sample [T, 2, H, W]
# (2**24 elements = 64 MiB per sample; data sets and batches hold many samples).
MAX_TIMESTEPS = 1024
MAX_SAMPLE_ELEMENTS = 2**24
MAX_SIDE = 16_384


class SpecError(TmktError, ValueError):
    """A DataSpec field that cannot be used; `field` names it (e.g. ``input_size``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r} {reason}")
        self.field = field
        self.reason = reason


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _ints(key: str, value: object, n: int, upper: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(_is_int(v) for v in value):
        raise SpecError(key, f"must be a list of {n} integers, got {value!r}"[:200])
    if not all(1 <= v <= upper for v in value):
        raise SpecError(key, f"must hold integers in 1..{upper}, got {list(value)}")
    return tuple(int(v) for v in value)


def _check_binning(binning: object) -> None:
    if not isinstance(binning, dict):
        raise SpecError("binning", f"must be a mapping, got {binning!r}"[:200])
    unknown = set(binning) - set(DEFAULT_BINNING)
    if unknown:
        raise SpecError("binning", f"has unknown keys {sorted(map(str, unknown))}; known: {sorted(DEFAULT_BINNING)}")
    if binning.get("by", "time") not in ("time", "count"):
        raise SpecError("binning.by", f"must be 'time' or 'count', got {binning['by']!r}")
    if binning.get("resize", "events") not in ("events", "frames"):
        raise SpecError("binning.resize", f"must be 'events' or 'frames', got {binning['resize']!r}")
    for key in ("binary", "shift_to_origin"):
        if key in binning and not isinstance(binning[key], bool):
            raise SpecError(f"binning.{key}", f"must be true or false, got {binning[key]!r}")


@dataclass(frozen=True)
class DataSpec:
    """Facts about a data set that a trained model depends on.

    name: data set name (``digits``, ``ncaltech101``, ...).
    class_names: label index -> name.
    sensor_size: ``(W, H, 2)`` of the recordings, tonic's order.
    input_size: ``(H, W)`` of the frames the network sees.
    timesteps: T, the number of frames per sample (1..``MAX_TIMESTEPS``).
    binning: how events become frames (see the module docstring); JSON-serialisable.

    A sample ``[T, 2, H, W]`` may hold at most ``MAX_SAMPLE_ELEMENTS`` values. Every field is
    checked on construction; a bad one raises ``SpecError`` naming it.
    """

    name: str
    class_names: tuple[str, ...]
    sensor_size: tuple[int, int, int]
    input_size: tuple[int, int]
    timesteps: int
    binning: dict

    def __post_init__(self) -> None:
        _check_binning(self.binning)
        # every spec names its resize, so that to_dict/from_dict cannot mistake it for a legacy one
        object.__setattr__(self, "binning", {"resize": DEFAULT_BINNING["resize"], **self.binning})
        if not isinstance(self.name, str):
            raise SpecError("name", f"must be a string, got {self.name!r}"[:200])
        if not self.class_names or not all(isinstance(c, str) for c in self.class_names):
            raise SpecError("class_names", "must be a non-empty list of strings")
        _ints("sensor_size", self.sensor_size, 3, MAX_SIDE)
        h, w = _ints("input_size", self.input_size, 2, MAX_SIDE)
        t = self.timesteps
        if not _is_int(t) or not 1 <= t <= MAX_TIMESTEPS:
            raise SpecError("timesteps", f"must be an integer in 1..{MAX_TIMESTEPS}, got {t!r}"[:200])
        if t * 2 * h * w > MAX_SAMPLE_ELEMENTS:
            raise SpecError("timesteps", f"{t} frames of 2 x {h} x {w} make {t * 2 * h * w:,} values per sample, "
                            f"over the limit of {MAX_SAMPLE_ELEMENTS:,}")

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["sensor_size"] = list(self.sensor_size)
        d["input_size"] = list(self.input_size)
        d["binning"] = dict(self.binning)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        """Inverse of ``to_dict``; a missing or malformed field raises ``SpecError`` naming it."""
        if not isinstance(d, dict):
            raise SpecError("data", f"must be a mapping, got {type(d).__name__}")
        for key in ("name", "class_names", "sensor_size", "input_size", "timesteps", "binning"):
            if key not in d:
                raise SpecError(key, "is missing")
        if not isinstance(d["class_names"], list):
            raise SpecError("class_names", "must be a list of strings")
        _check_binning(d["binning"])
        return cls(
            name=d["name"],
            class_names=tuple(d["class_names"]),
            sensor_size=_ints("sensor_size", d["sensor_size"], 3, MAX_SIDE),
            input_size=_ints("input_size", d["input_size"], 2, MAX_SIDE),
            timesteps=d["timesteps"],
            binning={"resize": LEGACY_RESIZE, **d["binning"]},
        )


def frames_from_events(
    events: np.ndarray | Sequence[np.ndarray], spec: DataSpec, *, max_bytes: int | None = MAX_FRAME_BYTES
) -> np.ndarray:
    """Bin one recording as the data sets of ``spec`` do.

    Args:
        events: ``[N]`` structured array with x, y, t (us), p (EVENT_DTYPE or tonic's); or a
            sequence of such arrays of one dtype (a live window's packets), binned as their
            concatenation without building it.
        spec: the data set's spec (from ``build_data`` or a checkpoint).
        max_bytes: ``FrameSizeError`` when the frames would need more memory (see
            ``tmkt.data.binning``); None for no limit.

    Returns:
        float32 ``[T, 2, H, W]`` with ``T = spec.timesteps``, ``(H, W) = spec.input_size``.
    """
    binning = {**DEFAULT_BINNING, **spec.binning}
    return bin_events(
        events,
        spec.sensor_size[:2],
        spec.timesteps,
        by=binning["by"],
        binary=bool(binning["binary"]),
        out_size=tuple(spec.input_size),
        resize=binning["resize"],
        outside="drop",
        shift_to_origin=bool(binning["shift_to_origin"]),
        max_bytes=max_bytes,
    )


@dataclass
class DataBundle:
    """What ``build_data`` hands the trainer.

    train: ``PairedDataset`` -> ``(static [T, 2, H, W], events [T, 2, H, W], label)``; its
        ``has_static`` is False when there is no static pool (the static element is then an
        empty tensor, and only event-only methods can train).
    val, test: event-only datasets -> ``(events [T, 2, H, W], label)``.
    spec: the ``DataSpec`` to store with the model.

    Every dataset has ``labels`` (``[N]`` int64) and ``class_names``.
    """

    train: object
    val: object
    test: object
    spec: DataSpec

    @property
    def has_static(self) -> bool:
        """Whether the training pairs carry static images (TMKT, EKT, fine-tune need them)."""
        return bool(getattr(self.train, "has_static", False))
