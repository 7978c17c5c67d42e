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

from dataclasses import asdict, dataclass

import numpy as np

from tmkt.data.binning import to_frames

DEFAULT_BINNING = {"by": "time", "binary": False, "shift_to_origin": False, "resize": "events"}
LEGACY_RESIZE = "frames"  # specs stored before the "resize" key existed resized frames


@dataclass(frozen=True)
class DataSpec:
    """Facts about a data set that a trained model depends on.

    name: data set name (``digits``, ``ncaltech101``, ...).
    class_names: label index -> name.
    sensor_size: ``(W, H, 2)`` of the recordings, tonic's order.
    input_size: ``(H, W)`` of the frames the network sees.
    timesteps: T, the number of frames per sample.
    binning: how events become frames (see the module docstring); JSON-serialisable.
    """

    name: str
    class_names: tuple[str, ...]
    sensor_size: tuple[int, int, int]
    input_size: tuple[int, int]
    timesteps: int
    binning: dict

    def __post_init__(self) -> None:
        # every spec names its resize, so that to_dict/from_dict cannot mistake it for a legacy one
        object.__setattr__(self, "binning", {"resize": DEFAULT_BINNING["resize"], **self.binning})
        unknown = set(self.binning) - set(DEFAULT_BINNING)
        if unknown:
            raise ValueError(f"unknown binning keys {sorted(unknown)}; known: {sorted(DEFAULT_BINNING)}")
        if self.binning.get("by", "time") not in ("time", "count"):
            raise ValueError(f"binning 'by' must be 'time' or 'count', got {self.binning['by']!r}")
        if self.binning.get("resize", "events") not in ("events", "frames"):
            raise ValueError(f"binning 'resize' must be 'events' or 'frames', got {self.binning['resize']!r}")
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")

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
        """Inverse of ``to_dict``."""
        return cls(
            name=str(d["name"]),
            class_names=tuple(str(c) for c in d["class_names"]),
            sensor_size=tuple(int(v) for v in d["sensor_size"]),
            input_size=tuple(int(v) for v in d["input_size"]),
            timesteps=int(d["timesteps"]),
            binning={"resize": LEGACY_RESIZE, **d["binning"]},
        )


def frames_from_events(events: np.ndarray, spec: DataSpec) -> np.ndarray:
    """Bin one recording as the data sets of ``spec`` do.

    Args:
        events: ``[N]`` structured array with x, y, t (us), p (EVENT_DTYPE or tonic's).
        spec: the data set's spec (from ``build_data`` or a checkpoint).

    Returns:
        float32 ``[T, 2, H, W]`` with ``T = spec.timesteps``, ``(H, W) = spec.input_size``.
    """
    binning = {**DEFAULT_BINNING, **spec.binning}
    events = np.asarray(events)
    w, h = spec.sensor_size[0], spec.sensor_size[1]
    if len(events):
        x = events["x"].astype(np.int64)
        y = events["y"].astype(np.int64)
        if binning["shift_to_origin"]:
            x = x - x.min()
            y = y - y.min()
        keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        shifted = np.empty(int(keep.sum()), dtype=[("x", "<i8"), ("y", "<i8"), ("t", "<i8"), ("p", "u1")])
        shifted["x"], shifted["y"] = x[keep], y[keep]
        shifted["t"] = events["t"][keep]
        shifted["p"] = np.asarray(events["p"])[keep] > 0
        events = shifted
    return to_frames(
        events,
        (w, h, 2),
        spec.timesteps,
        by=binning["by"],
        binary=bool(binning["binary"]),
        out_size=tuple(spec.input_size),
        resize=binning["resize"],
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
