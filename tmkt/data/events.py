"""Read, check, write and summarize event-camera recordings.

Every reader returns a :class:`Recording` whose ``events`` is a structured array of
``EVENT_DTYPE``: ``x``, ``y`` (pixel column and row), ``t`` (microseconds, non-decreasing)
and ``p`` (0 = OFF, 1 = ON). ``sensor_size`` is ``(W, H, 2)``, the order tonic uses.

Formats (chosen by file suffix):

- ``.bin``: N-MNIST / N-Caltech101 ATIS records, 40 bits per event (tonic's reader).
  Sensor: given, else 34x34 when every event fits (N-MNIST), else max coordinate + 1
  (N-Caltech101 samples differ in size). Coordinates are kept as stored.
- ``.aedat4``: AEDAT4 (CIFAR10-DVS), decoded by the ``aedat`` package through tonic.
  Sensor: from the file's stream description, else 128x128.
- ``.npy``: a structured array with fields x, y, t, p; or an unstructured ``N x 4`` array in
  tonic's preprocessed DVS128-Gesture layout (columns x, y, p, t with t in milliseconds;
  sensor 128x128).
- ``.npz`` / ``.h5`` / ``.hdf5``: separate x, y, t, p arrays (top level or in an ``events``
  group), or one structured ``events`` array; optional ``sensor_size``.
- ``.raw``: Prophesee EVT 2.0 (expelliarmus) or EVT 3.0 (decoded here, see
  :func:`_decode_evt3`), chosen by the text header.
- ``.dat``: Prophesee DAT CD events (expelliarmus).

A file that cannot be read raises one :class:`EventFileError` naming the file and the problem.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmkt.errors import TmktError
from tmkt.fileio import atomic_path

EVENT_DTYPE = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")])

READ_SUFFIXES = (".bin", ".aedat4", ".npy", ".npz", ".h5", ".hdf5", ".raw", ".dat")
WRITE_SUFFIXES = (".bin", ".npy", ".npz", ".h5", ".hdf5")

NMNIST_SIZE = (34, 34, 2)
DVS128_SIZE = (128, 128, 2)

# ATIS .bin: a record whose y byte is 240 is a timestamp-overflow marker, and each one adds
# 2**13 us to every later timestamp (the convention of the N-MNIST authors' reader, which
# tonic keeps). The 23-bit timestamp field itself holds up to 2**23 - 1.
_ATIS_OVERFLOW_Y = 240
_ATIS_OVERFLOW_US = 2**13
_ATIS_TS_MAX = 2**23 - 1


class EventFileError(TmktError, ValueError):
    """An event file (or event array) is unreadable or holds invalid events."""


@dataclass(frozen=True)
class Recording:
    """One event recording.

    Attributes:
        events: ``[N]`` structured array of ``EVENT_DTYPE``, time-sorted.
        sensor_size: ``(W, H, 2)``.
        path: the file it came from, if any.
    """

    events: np.ndarray
    sensor_size: tuple[int, int, int]
    path: str | None = None


# --------------------------------------------------------------------------- validation


def _normalize_sensor_size(sensor_size, source: str) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in np.asarray(sensor_size).ravel())
    except (TypeError, ValueError) as exc:
        raise EventFileError(f"{source}: sensor size {sensor_size!r} is not a tuple of integers") from exc
    if len(size) == 2:
        size = (*size, 2)
    if len(size) != 3 or size[0] <= 0 or size[1] <= 0 or size[2] != 2:
        raise EventFileError(f"{source}: sensor size {sensor_size!r} must be (W, H) or (W, H, 2) with W, H > 0")
    return size  # type: ignore[return-value]


def _as_int(values: np.ndarray, name: str, source: str) -> np.ndarray:
    """Integer view of one field; float fields must be finite and whole."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise EventFileError(f"{source}: field {name!r} holds NaN or infinite values")
        if name != "t" and not np.array_equal(values, np.round(values)):
            raise EventFileError(f"{source}: field {name!r} holds non-integer coordinates")
        return np.rint(values).astype(np.int64)
    if values.dtype.kind == "b":
        return values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise EventFileError(f"{source}: field {name!r} has non-numeric dtype {values.dtype}")
    return values.astype(np.int64, copy=False)


def _polarity(p: np.ndarray, source: str) -> np.ndarray:
    """Map polarity conventions (bool, {0, 1}, {-1, 1}) to {0, 1}."""
    p = np.asarray(p)
    if p.dtype.kind == "b":
        return p.astype(np.uint8)
    ints = _as_int(p, "p", source)
    if ints.size == 0:
        return ints.astype(np.uint8)
    lo, hi = int(ints.min()), int(ints.max())
    if lo >= 0 and hi <= 1:
        return ints.astype(np.uint8)
    if lo >= -1 and hi <= 1 and not (ints == 0).any():
        return (ints > 0).astype(np.uint8)  # the {-1, 1} convention
    bad = np.unique(ints[(ints < 0) | (ints > 1)])[:5]
    raise EventFileError(f"{source}: polarity must be 0/1, -1/1 or bool, found values {bad.tolist()}")


def validate_events(events: np.ndarray, sensor_size, source: str = "<events>") -> np.ndarray:
    """Check events and convert them to ``EVENT_DTYPE``.

    Args:
        events: ``[N]`` structured array with at least fields x, y, t, p (any numeric widths;
            extra fields are dropped). Polarity may be bool, {0, 1} or {-1, 1}.
        sensor_size: ``(W, H)`` or ``(W, H, 2)``.
        source: the name used in error messages (usually the file path).

    Returns:
        ``[N]`` array of ``EVENT_DTYPE``. Out-of-order timestamps are stable-sorted, with a
        warning.

    Raises:
        EventFileError: missing fields, NaN, non-integer or out-of-sensor coordinates, bad
            polarity values.
    """
    events = np.asarray(events)
    names = events.dtype.names or ()
    missing = [f for f in ("x", "y", "t", "p") if f not in names]
    if missing:
        raise EventFileError(f"{source}: events lack field(s) {', '.join(missing)} (found {list(names)})")
    if events.ndim != 1:
        raise EventFileError(f"{source}: events must be a 1-D array, got shape {events.shape}")
    width, height, _ = _normalize_sensor_size(sensor_size, source)
    x = _as_int(events["x"], "x", source)
    y = _as_int(events["y"], "y", source)
    t = _as_int(events["t"], "t", source)
    p = _polarity(events["p"], source)
    for name, values, limit in (("x", x, width), ("y", y, height)):
        outside = (values < 0) | (values >= limit)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise EventFileError(
                f"{source}: {int(outside.sum())} event(s) have {name} outside the sensor "
                f"[0, {limit}) of size {width}x{height} (first: event {first}, {name}={int(values[first])})"
            )
    out = np.empty(len(events), dtype=EVENT_DTYPE)
    out["x"], out["y"], out["t"], out["p"] = x, y, t, p
    if len(out) > 1 and (np.diff(t) < 0).any():
        warnings.warn(f"{source}: timestamps are not sorted; stable-sorting the events by time", stacklevel=2)
        out = out[np.argsort(t, kind="stable")]
    return out


def _inferred_size(events: np.ndarray) -> tuple[int, int, int]:
    if len(events) == 0:
        return (1, 1, 2)
    return (int(np.max(events["x"])) + 1, int(np.max(events["y"])) + 1, 2)


# --------------------------------------------------------------------------- readers


def _fields(**arrays) -> np.ndarray:
    """Structured array from equal-length field arrays (dtypes as given)."""
    lengths = {len(np.asarray(v)) for v in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"fields have different lengths {sorted(lengths)}")
    out = np.empty(lengths.pop(), dtype=[(k, np.asarray(v).dtype) for k, v in arrays.items()])
    for k, v in arrays.items():
        out[k] = v
    return out


def _read_atis_bin(path: str) -> tuple[np.ndarray, tuple | None]:
    from tonic.io import read_mnist_file

    size = os.path.getsize(path)
    if size % 5:
        raise EventFileError(
            f"{path}: truncated ATIS .bin file: {size} bytes is not a multiple of the 5-byte event record"
        )
    dtype = np.dtype([("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])
    events = read_mnist_file(path, dtype=dtype)
    fits_nmnist = len(events) == 0 or (events["x"].max() < NMNIST_SIZE[0] and events["y"].max() < NMNIST_SIZE[1])
    return events, NMNIST_SIZE if fits_nmnist else None


def _read_aedat4(path: str) -> tuple[np.ndarray, tuple | None]:
    with open(path, "rb") as fh:
        if fh.read(14) != b"#!AER-DAT4.0\r\n":
            raise EventFileError(f"{path}: not an AEDAT4 file (missing the '#!AER-DAT4.0' magic line)")
    try:
        import aedat
    except ImportError as exc:
        raise EventFileError(
            f"{path}: reading .aedat4 needs the 'aedat' package, which is not installed (pip install aedat)"
        ) from exc
    from tonic.io import read_aedat4

    size = None
    for stream in aedat.Decoder(path).id_to_stream().values():
        if stream.get("type") == "events" and stream.get("width") and stream.get("height"):
            size = (int(stream["width"]), int(stream["height"]), 2)
            break
    raw = read_aedat4(path)  # fields t, x, y, on
    events = _fields(x=raw["x"], y=raw["y"], t=raw["t"], p=raw["on"])
    return events, size or DVS128_SIZE


def _from_mapping(get, keys, source: str) -> tuple[np.ndarray, tuple | None]:
    """Events from a key -> array lookup (npz archive or h5 file)."""
    size = get("sensor_size") if "sensor_size" in keys else None
    if "events" in keys:
        events = np.asarray(get("events"))
        if events.dtype.names:
            return events, size
    if all(k in keys for k in ("x", "y", "t", "p")):
        return _fields(**{k: np.asarray(get(k)).ravel() for k in ("x", "y", "t", "p")}), size
    raise EventFileError(
        f"{source}: found neither arrays x, y, t, p nor a structured 'events' array (keys: {sorted(keys)})"
    )


def _read_npy(path: str) -> tuple[np.ndarray, tuple | None]:
    array = np.load(path, allow_pickle=False)
    if array.dtype.names:
        return array, None
    if array.ndim == 2 and array.shape[1] == 4 and array.dtype.kind in "iuf":
        # tonic's preprocessed DVS128-Gesture sample: columns x, y, p, t with t in ms.
        t_us = array[:, 3].astype(np.float64) * 1000.0 if array.dtype.kind == "f" else array[:, 3].astype(np.int64) * 1000
        return _fields(x=array[:, 0], y=array[:, 1], t=t_us, p=array[:, 2]), DVS128_SIZE
    raise EventFileError(
        f"{path}: .npy must hold a structured array with fields x, y, t, p or an N x 4 DVS128-Gesture "
        f"array (x, y, p, t[ms]); got dtype {array.dtype} and shape {array.shape}"
    )


def _read_npz(path: str) -> tuple[np.ndarray, tuple | None]:
    with np.load(path, allow_pickle=False) as archive:
        return _from_mapping(archive.__getitem__, set(archive.files), path)


def _read_h5(path: str) -> tuple[np.ndarray, tuple | None]:
    import h5py

    with h5py.File(path, "r") as fh:
        group = fh["events"] if "events" in fh and isinstance(fh["events"], h5py.Group) else fh
        keys = set(group.keys())

        def get(key):
            return group[key][()]

        size = fh.attrs.get("sensor_size")
        if size is None and "sensor_size" in fh and isinstance(fh["sensor_size"], h5py.Dataset):
            size = fh["sensor_size"][()]
        events, stored = _from_mapping(get, keys, path)
        return events, stored if stored is not None else size


def _prophesee_header(path: str) -> tuple[dict[str, str], int]:
    """The '%'-prefixed text header: ({lowercased key: value}, offset of the binary data)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        offset = 0
        while True:
            line = fh.readline()
            if not line.startswith(b"%"):
                break
            offset += len(line)
            text = line[1:].decode("latin-1").strip()
            if text.lower() == "end":
                break
            key, _, value = text.partition(" ")
            fields[key.lower()] = value.strip()
            if key.lower() == "format":  # "EVT3;height=720;width=1280"
                for part in value.split(";")[1:]:
                    k, _, v = part.partition("=")
                    fields[k.strip().lower()] = v.strip()
    return fields, offset


def _prophesee_size(header: dict[str, str]) -> tuple | None:
    if "geometry" in header:
        match = re.fullmatch(r"(\d+)x(\d+)", header["geometry"])
        if match:
            return (int(match.group(1)), int(match.group(2)), 2)
    if "width" in header and "height" in header:
        try:
            return (int(header["width"]), int(header["height"]), 2)
        except ValueError:
            return None
    return None


def _expelliarmus_read(path: str, encoding: str) -> np.ndarray:
    from expelliarmus import Wizard

    return Wizard(encoding=encoding).read(path)  # fields t, x, y, p


def _read_raw(path: str) -> tuple[np.ndarray, tuple | None]:
    header, offset = _prophesee_header(path)
    version = header.get("evt", "")
    fmt = header.get("format", "").split(";")[0].strip().upper()
    payload = os.path.getsize(path) - offset
    if version.startswith("3") or fmt == "EVT3":
        if payload % 2:
            raise EventFileError(f"{path}: truncated EVT3 data: {payload} bytes is not a multiple of 2")
        words = np.fromfile(path, dtype="<u2", offset=offset)
        return _decode_evt3(words), _prophesee_size(header)
    if version.startswith("2") or fmt == "EVT2":
        if payload % 4:
            raise EventFileError(f"{path}: truncated EVT2 data: {payload} bytes is not a multiple of 4")
        if payload == 0:
            return np.empty(0, dtype=EVENT_DTYPE), _prophesee_size(header)
        return _expelliarmus_read(path, "evt2"), _prophesee_size(header)
    raise EventFileError(
        f"{path}: unknown Prophesee .raw encoding (header says evt={version or '?'}, format={fmt or '?'}); "
        "EVT 2.0 and EVT 3.0 are supported"
    )


def _read_dat(path: str) -> tuple[np.ndarray, tuple | None]:
    header, offset = _prophesee_header(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        type_size = fh.read(2)
    if len(type_size) < 2:
        raise EventFileError(f"{path}: truncated .dat file: no event type/size bytes after the header")
    if type_size[1] != 8:
        raise EventFileError(f"{path}: .dat event size is {type_size[1]} bytes; only 8-byte CD events are supported")
    payload = os.path.getsize(path) - offset - 2
    if payload % 8:
        raise EventFileError(f"{path}: truncated .dat file: {payload} bytes of events is not a multiple of 8")
    if payload == 0:
        return np.empty(0, dtype=EVENT_DTYPE), _prophesee_size(header)
    return _expelliarmus_read(path, "dat"), _prophesee_size(header)


def _decode_evt3(words: np.ndarray) -> np.ndarray:
    """Decode Prophesee EVT 3.0 16-bit words (vectorized).

    expelliarmus also reads EVT3, but (v1.1.12) it adds a spurious 4096 us whenever the
    12-bit TIME_LOW wraps together with a TIME_HIGH step, so it is not used here.
    Word types (bits 15..12): 0x0 ADDR_Y (y), 0x2 ADDR_X (one event: p bit 11, x), 0x3
    VECT_BASE_X (p bit 11, base x), 0x4 VECT_12 / 0x5 VECT_8 (bitmask of events at base x + i,
    base then advances by 12 / 8), 0x6 TIME_LOW, 0x8 TIME_HIGH (t = high << 12 | low; the
    24-bit time base wraps, counted here). Other types carry no CD event and are skipped.
    """
    words = np.asarray(words, dtype=np.uint16)
    kind = words >> 12
    value = (words & 0x0FFF).astype(np.int64)
    idx = np.arange(len(words))

    def last(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
        """At each word, the value of the latest word matching mask (0 before the first)."""
        pos = np.maximum.accumulate(np.where(mask, idx, -1))
        return np.where(pos >= 0, values[np.maximum(pos, 0)], 0)

    is_high = kind == 0x8
    high = value.copy()
    high_vals = value[is_high]
    wraps = np.concatenate([[0], np.cumsum(np.diff(high_vals) < 0)])  # 24-bit time base wraps
    high[is_high] = high_vals + wraps * 4096
    t = (last(is_high, high) << 12) | last(kind == 0x6, value)
    y = last(kind == 0x0, value & 0x7FF)

    single = kind == 0x2
    parts_pos = [idx[single]]
    parts_bit = [np.zeros(int(single.sum()), dtype=np.int64)]
    parts_x = [value[single] & 0x7FF]
    parts_p = [(value[single] >> 11) & 1]

    is_base = kind == 0x3
    is_vec = (kind == 0x4) | (kind == 0x5)
    if is_vec.any():
        width = np.where(kind == 0x4, 12, np.where(kind == 0x5, 8, 0))
        done = np.cumsum(width) - width  # vector width consumed before each word
        base_pos = np.maximum.accumulate(np.where(is_base, idx, -1))
        base_ok = base_pos >= 0
        bp = np.maximum(base_pos, 0)
        x0 = np.where(base_ok, (value[bp] & 0x7FF) + done - done[bp], 0)
        pol = np.where(base_ok, (value[bp] >> 11) & 1, 0)
        vec_idx = idx[is_vec]
        bits = np.arange(12)
        set_bits = (value[vec_idx, None] >> bits) & 1
        set_bits &= bits < width[vec_idx, None]
        rows, cols = np.nonzero(set_bits)
        src = vec_idx[rows]
        parts_pos.append(src)
        parts_bit.append(cols)
        parts_x.append(x0[src] + cols)
        parts_p.append(pol[src])

    pos = np.concatenate(parts_pos)
    order = np.lexsort((np.concatenate(parts_bit), pos))
    pos = pos[order]
    out = np.empty(len(pos), dtype=EVENT_DTYPE)
    out["x"] = np.concatenate(parts_x)[order]
    out["y"] = y[pos]
    out["t"] = t[pos]
    out["p"] = np.concatenate(parts_p)[order]
    return out


_READERS = {
    ".bin": _read_atis_bin,
    ".aedat4": _read_aedat4,
    ".npy": _read_npy,
    ".npz": _read_npz,
    ".h5": _read_h5,
    ".hdf5": _read_h5,
    ".raw": _read_raw,
    ".dat": _read_dat,
}


def read_events(path: str | os.PathLike, sensor_size=None) -> Recording:
    """Read an event file (format chosen by suffix, see the module docstring).

    Args:
        path: the file.
        sensor_size: ``(W, H)`` or ``(W, H, 2)``; overrides what the file says or implies.

    Returns:
        a :class:`Recording` with ``EVENT_DTYPE`` events sorted by time.

    Raises:
        EventFileError: missing, unknown, corrupt or truncated file, or invalid events; the
            message names the file.
    """
    source = str(path)
    suffix = Path(source).suffix.lower()
    if suffix not in _READERS:
        raise EventFileError(f"{source}: unsupported suffix {suffix!r}; expected one of {', '.join(READ_SUFFIXES)}")
    if not os.path.isfile(source):
        raise EventFileError(f"{source}: no such file")
    try:
        events, stored_size = _READERS[suffix](source)
    except (EventFileError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # decoder errors of numpy, h5py, tonic, aedat (Rust panics too)
        raise EventFileError(f"{source}: cannot decode {suffix} file ({type(exc).__name__}: {exc})") from None
    if sensor_size is not None or stored_size is not None:
        size = _normalize_sensor_size(sensor_size if sensor_size is not None else stored_size, source)
        return Recording(events=validate_events(events, size, source), sensor_size=size, path=source)
    # No size known: check against the widest sensor EVENT_DTYPE holds, then take max + 1.
    events = validate_events(events, (2**16, 2**16), source)
    return Recording(events=events, sensor_size=_inferred_size(events), path=source)


# --------------------------------------------------------------------------- writers


def _encode_atis(events: np.ndarray) -> bytes:
    """ATIS 40-bit records, with y=240 overflow markers so that t fits 23 bits."""
    t = events["t"].astype(np.int64)
    # overflow markers needed before each event so that t - k * 2**13 fits the 23-bit field
    k = np.maximum(0, -(-(t - _ATIS_TS_MAX) // _ATIS_OVERFLOW_US))
    new = np.diff(np.concatenate([[0], k]))  # markers to emit just before each event
    n_rec = len(events) + int(new.sum())
    rec = np.zeros((n_rec, 5), dtype=np.uint8)
    slot = np.arange(len(events)) + np.cumsum(new)  # record index of each event
    rec[:, 1] = _ATIS_OVERFLOW_Y  # every row not overwritten below is a marker
    ts = t - k * _ATIS_OVERFLOW_US
    rec[slot, 0] = events["x"]
    rec[slot, 1] = events["y"]
    rec[slot, 2] = (events["p"].astype(np.int64) << 7) | (ts >> 16)
    rec[slot, 3] = (ts >> 8) & 0xFF
    rec[slot, 4] = ts & 0xFF
    return rec.tobytes()


def write_events(path: str | os.PathLike, events: np.ndarray, sensor_size) -> None:
    """Write events to ``.npz``, ``.npy``, ``.h5``/``.hdf5`` or N-MNIST ``.bin``.

    ``.npz`` and ``.h5`` store the sensor size; ``.npy`` (a structured ``EVENT_DTYPE`` array)
    does not. ``.bin`` needs a sensor with W <= 256 and H <= 240 (y = 240 marks timestamp
    overflow) and t >= 0. The write is atomic (temporary file, then rename).

    Args:
        path: destination; the suffix picks the format.
        events: ``[N]`` structured array with x, y, t, p (validated first).
        sensor_size: ``(W, H)`` or ``(W, H, 2)``.
    """
    target = str(path)
    suffix = Path(target).suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise EventFileError(f"{target}: cannot write suffix {suffix!r}; expected one of {', '.join(WRITE_SUFFIXES)}")
    size = _normalize_sensor_size(sensor_size, target)
    events = validate_events(events, size, target)
    if suffix == ".bin":
        if size[0] > 256 or size[1] > _ATIS_OVERFLOW_Y:
            raise EventFileError(f"{target}: .bin holds 8-bit coordinates with y < 240; sensor {size[:2]} is too large")
        if len(events) and events["t"][0] < 0:
            raise EventFileError(f"{target}: .bin cannot store negative timestamps")
    with atomic_path(target, suffix=suffix) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, x=events["x"], y=events["y"], t=events["t"], p=events["p"], sensor_size=np.array(size))
        elif suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, events)
        elif suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(tmp, "w") as fh:
                for name in ("x", "y", "t", "p"):
                    fh.create_dataset(name, data=events[name])
                fh.attrs["sensor_size"] = np.array(size)
        else:
            with open(tmp, "wb") as fh:
                fh.write(_encode_atis(events))


# --------------------------------------------------------------------------- summary


def summarize(rec: Recording) -> dict:
    """Facts about a recording, JSON-ready.

    Keys: path, events, sensor_size ``[W, H, 2]``, t_first_us, t_last_us (None when empty),
    duration_s, rate_ev_s (events / duration; 0 when the duration is 0), on_events,
    off_events, on_fraction (ON / all; None when empty).
    """
    ev = rec.events
    n = int(len(ev))
    on = int(np.count_nonzero(ev["p"])) if n else 0
    t_first = int(ev["t"][0]) if n else None
    t_last = int(ev["t"][-1]) if n else None
    duration = (t_last - t_first) / 1e6 if n else 0.0
    return {
        "path": rec.path,
        "events": n,
        "sensor_size": [int(v) for v in rec.sensor_size],
        "t_first_us": t_first,
        "t_last_us": t_last,
        "duration_s": duration,
        "rate_ev_s": n / duration if duration > 0 else 0.0,
        "on_events": on,
        "off_events": n - on,
        "on_fraction": on / n if n else None,
    }
