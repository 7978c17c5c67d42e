"""Read, check, write and summarize event-camera recordings.

Every reader returns events as a structured array of ``EVENT_DTYPE``: ``x``, ``y`` (pixel
column and row), ``t`` (microseconds, non-decreasing) and ``p`` (0 = OFF, 1 = ON).
``sensor_size`` is ``(W, H, 2)``, the order tonic uses.

Formats (chosen by file suffix):

- ``.bin``: N-MNIST / N-Caltech101 ATIS records, 40 bits per event (tonic's layout and its
  timestamp-overflow markers). Sensor: given, else 34x34 when every event fits (N-MNIST), else
  max coordinate + 1 (N-Caltech101 samples differ in size). Coordinates are kept as stored.
- ``.aedat4``: AEDAT4 (CIFAR10-DVS), decoded packet by packet by the ``aedat`` package after its
  header (flatbuffer, XML stream description) has been checked here: ``aedat`` reads that header
  unchecked in Rust and aborts the process on a corrupt one. Sensor: from the description, else
  128x128. Events come from the lowest-numbered event stream (as tonic reads them).
- ``.npy``: a structured array with fields x, y, t, p; or an unstructured ``N x 4`` array in
  tonic's preprocessed DVS128-Gesture layout (columns x, y, p, t with t in milliseconds;
  sensor 128x128).
- ``.npz`` / ``.h5`` / ``.hdf5``: separate x, y, t, p arrays (top level or in an ``events``
  group), or one structured ``events`` array; optional ``sensor_size``.
- ``.raw``: Prophesee EVT 2.0 or EVT 3.0 (see :func:`_decode_evt3_chunk`), chosen by the text
  header.
- ``.dat``: Prophesee DAT CD events (8-byte records; a 32-bit timestamp that goes back is taken
  as a wrap of its counter, as expelliarmus reads it).

Long recordings are read in chunks (:func:`open_events`): numpy, zip and HDF5 arrays a slice at a
time, the binary formats a block of records at a time, AEDAT4 a packet at a time. ``scan_events``
(the summary) and :func:`time_windows` (windowed inference) so need memory for one chunk, not
for the recording. ``read_events`` joins the chunks into one array.

Limits (:class:`ReadLimits`): a compressed container (``.npz`` member, compressed HDF5 dataset)
may declare at most ``max_expansion`` times its stored bytes (:class:`DecompressedSizeError`);
header text is bounded. A file that cannot be read raises one :class:`EventFileError` naming the
file and the problem; decoder errors of numpy, zipfile, h5py and aedat are turned into one.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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

# Below this many declared bytes a compressed container is never called a bomb: small arrays
# (a sensor size, a constant polarity column) compress far beyond any ratio.
MIN_BOMB_BYTES = 64 << 20
# Text headers (Prophesee '%' lines, the AEDAT4 description) are small; a longer one is corrupt.
_MAX_HEADER_BYTES = 1 << 20
_MAX_HEADER_LINE = 64 << 10
_INT64_MAX = 2**63 - 1


class EventFileError(TmktError, ValueError):
    """An event file (or event array) is unreadable or holds invalid events."""


class DecompressedSizeError(EventFileError):
    """A compressed container declares far more data than it stores (a decompression bomb, or a
    genuine but extreme file: raise ``ReadLimits.max_expansion`` / ``--max-expansion``)."""


class EventOrderError(EventFileError):
    """Events go back in time where a streaming consumer needs them sorted; read the file whole
    with :func:`read_events`, which sorts them."""


@dataclass(frozen=True)
class ReadLimits:
    """Limits that protect the machine from hostile or broken files.

    Attributes:
        max_expansion: a compressed container may declare at most this many times the bytes it
            stores (counted over the arrays read; containers declaring under 64 MiB are exempt).
            Event arrays compress 2-10 fold; 100 leaves room and stops a 389 KB ``.npz`` that
            unpacks to 400 MB. CLI: ``--max-expansion``.
        chunk_events: events (for .raw: 16- or 32-bit words) per chunk of the streaming reader;
            a chunk costs up to about 150 bytes per event while it is decoded and checked.
    """

    max_expansion: float = 100.0
    chunk_events: int = 1 << 18

    def __post_init__(self) -> None:
        if not self.max_expansion >= 1:
            raise ValueError(f"max_expansion must be >= 1, got {self.max_expansion!r}")
        if int(self.chunk_events) < 1:
            raise ValueError(f"chunk_events must be >= 1, got {self.chunk_events!r}")


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
        arr = np.asarray(sensor_size)
        if arr.size > 8 or arr.dtype.kind not in "iuf":
            raise TypeError
        size = tuple(int(v) for v in arr.ravel())
    except (TypeError, ValueError, OverflowError) as exc:
        raise EventFileError(f"{source}: sensor size {sensor_size!r} is not a tuple of integers") from exc
    if len(size) == 2:
        size = (*size, 2)
    if len(size) != 3 or not (0 < size[0] <= 2**16 and 0 < size[1] <= 2**16) or size[2] != 2:
        raise EventFileError(
            f"{source}: sensor size {sensor_size!r} must be (W, H) or (W, H, 2) with 0 < W, H <= 65536"
        )
    return size  # type: ignore[return-value]


def _as_int(values: np.ndarray, name: str, source: str) -> np.ndarray:
    """Integer view of one field; float fields must be finite and whole, all within int64."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise EventFileError(f"{source}: field {name!r} holds NaN or infinite values")
        if len(values) and (values.min() < -(2.0**63) or values.max() >= 2.0**63):
            raise EventFileError(f"{source}: field {name!r} holds values beyond the int64 range")
        if name != "t" and not np.array_equal(values, np.round(values)):
            raise EventFileError(f"{source}: field {name!r} holds non-integer coordinates")
        return np.rint(values).astype(np.int64)
    if values.dtype.kind == "b":
        return values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise EventFileError(f"{source}: field {name!r} has non-numeric dtype {values.dtype}")
    if values.dtype.kind == "u" and values.dtype.itemsize == 8 and len(values) and values.max() > _INT64_MAX:
        raise EventFileError(
            f"{source}: field {name!r} holds values above 2**63 - 1 (unsigned 64-bit values that do not fit int64)"
        )
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


def _check_fields(dtype: np.dtype, source: str) -> None:
    """Fields x, y, t, p present, each one number per event."""
    names = dtype.names or ()
    missing = [f for f in ("x", "y", "t", "p") if f not in names]
    if missing:
        raise EventFileError(f"{source}: events lack field(s) {', '.join(missing)} (found {list(names)})")
    for name in ("x", "y", "t", "p"):
        field = dtype.fields[name][0]
        if field.shape != ():
            raise EventFileError(
                f"{source}: field {name!r} holds a sub-array of shape {field.shape} per event; "
                "it must hold one number per event"
            )


def _check_chunk(events: np.ndarray, width: int, height: int, source: str, first: int = 0) -> np.ndarray:
    """``EVENT_DTYPE`` copy of one chunk of events, checked, in the order given (no sorting);
    ``first`` is the index of the chunk's first event in the file (for messages)."""
    events = np.asarray(events)
    _check_fields(events.dtype, source)
    if events.ndim != 1:
        raise EventFileError(f"{source}: events must be a 1-D array, got shape {events.shape}")
    x = _as_int(events["x"], "x", source)
    y = _as_int(events["y"], "y", source)
    t = _as_int(events["t"], "t", source)
    p = _polarity(events["p"], source)
    for name, values, limit in (("x", x, width), ("y", y, height)):
        outside = (values < 0) | (values >= limit)
        if outside.any():
            at = int(np.flatnonzero(outside)[0])
            raise EventFileError(
                f"{source}: event(s) have {name} outside the sensor [0, {limit}) of size {width}x{height} "
                f"(first: event {first + at}, {name}={int(values[at])})"
            )
    out = np.empty(len(events), dtype=EVENT_DTYPE)
    out["x"], out["y"], out["t"], out["p"] = x, y, t, p
    return out


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
        EventFileError: missing or sub-array fields, NaN, non-integer or out-of-sensor
            coordinates, values beyond int64, bad polarity values.
    """
    width, height, _ = _normalize_sensor_size(sensor_size, source)
    out = _check_chunk(events, width, height, source)
    if len(out) > 1 and (np.diff(out["t"]) < 0).any():
        warnings.warn(f"{source}: timestamps are not sorted; stable-sorting the events by time", stacklevel=2)
        out = out[np.argsort(out["t"], kind="stable")]
    return out


# --------------------------------------------------------------------------- readers
#
# A reader checks what it can before any event is decoded (header, declared sizes) and
# returns an _Opened: the sensor size the file states (or None), a size to use when every
# event fits it (N-MNIST for .bin), and an iterator over chunks of raw events (structured
# arrays with fields x, y, t, p of any numeric dtype, checked later by EventStream).


class _Opened(NamedTuple):
    size: tuple | None
    fits: tuple | None
    chunks: Iterator[np.ndarray]


def _fields(**arrays) -> np.ndarray:
    """Structured array from equal-length field arrays (dtypes as given)."""
    lengths = {len(np.asarray(v)) for v in arrays.values()}
    if len(lengths) != 1:
        raise EventFileError(f"fields have different lengths {sorted(lengths)}")
    out = np.empty(lengths.pop(), dtype=[(k, np.asarray(v).dtype) for k, v in arrays.items()])
    for k, v in arrays.items():
        out[k] = v
    return out


def _blocks(path: str, offset: int, record: int, per_block: int) -> Iterator[bytes]:
    """The file's bytes from ``offset`` on in blocks of ``per_block`` records of ``record`` bytes."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            data = fh.read(record * per_block)
            if not data:
                return
            yield data


# .bin ---------------------------------------------------------------------------------


def _open_atis(path: str, limits: ReadLimits) -> _Opened:
    size = os.path.getsize(path)
    if size % 5:
        raise EventFileError(
            f"{path}: truncated ATIS .bin file: {size} bytes is not a multiple of the 5-byte event record"
        )

    def chunks() -> Iterator[np.ndarray]:
        overflows = 0
        for data in _blocks(path, 0, 5, limits.chunk_events):
            rec = np.frombuffer(data, np.uint8).reshape(-1, 5).astype(np.int64)
            marker = rec[:, 1] == _ATIS_OVERFLOW_Y
            count = overflows + np.cumsum(marker)  # markers at or before each record
            overflows = int(count[-1])
            keep = ~marker
            ts = ((rec[:, 2] & 127) << 16) | (rec[:, 3] << 8) | rec[:, 4]
            yield _fields(x=rec[keep, 0], y=rec[keep, 1], t=(ts + count * _ATIS_OVERFLOW_US)[keep], p=rec[keep, 2] >> 7)

    return _Opened(None, NMNIST_SIZE, chunks())


# .aedat4 ------------------------------------------------------------------------------

_AEDAT4_MAGIC = b"#!AER-DAT4.0\r\n"
_AEDAT4_COMPRESSIONS = ("none", "LZ4", "LZ4 high", "Zstd", "Zstd high")


def _aedat4_description(path: str) -> tuple[str, int, int, int]:
    """Check the IOHeader flatbuffer the way the Rust decoder will read it (unchecked: every
    offset it follows must lie inside the buffer, the description must be UTF-8) and return the
    description. Raises EventFileError on anything the decoder could trip over."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if fh.read(len(_AEDAT4_MAGIC)) != _AEDAT4_MAGIC:
            raise EventFileError(f"{path}: not an AEDAT4 file (missing the '#!AER-DAT4.0' magic line)")
        raw_len = fh.read(4)
        if len(raw_len) < 4:
            raise EventFileError(f"{path}: truncated AEDAT4 file: no header length after the magic line")
        (length,) = struct.unpack("<I", raw_len)
        if length > file_size - len(_AEDAT4_MAGIC) - 4 or length > _MAX_HEADER_BYTES:
            raise EventFileError(
                f"{path}: corrupt AEDAT4 header: it declares {length} bytes, the file holds "
                f"{file_size - len(_AEDAT4_MAGIC) - 4} after the magic line (limit {_MAX_HEADER_BYTES})"
            )
        buf = fh.read(length)

    def bad(what: str) -> EventFileError:
        return EventFileError(f"{path}: corrupt AEDAT4 header: {what}")

    def u32(at: int) -> int:
        if not 0 <= at <= len(buf) - 4:
            raise bad(f"offset {at} outside the {len(buf)}-byte header")
        return struct.unpack_from("<I", buf, at)[0]

    def u16(at: int) -> int:
        if not 0 <= at <= len(buf) - 2:
            raise bad(f"offset {at} outside the {len(buf)}-byte header")
        return struct.unpack_from("<H", buf, at)[0]

    table = u32(0)
    vtable = table - struct.unpack("<i", struct.pack("<I", u32(table)))[0]
    vt_size = u16(vtable)
    if vt_size < 4 or vt_size % 2 or vtable + vt_size > len(buf):
        raise bad(f"vtable of {vt_size} bytes at {vtable} does not fit")

    def field(slot: int, size: int) -> int | None:
        """Position of field ``slot`` (its ``size`` bytes inside the buffer), None if absent."""
        at = 4 + 2 * slot
        off = u16(vtable + at) if at + 2 <= vt_size else 0
        if off == 0:
            return None
        if table + off + size > len(buf):
            raise bad(f"field {slot} at {table + off} lies outside the header")
        return table + off

    pos = field(0, 4)
    compression = struct.unpack_from("<i", buf, pos)[0] if pos is not None else 0
    if not 0 <= compression < len(_AEDAT4_COMPRESSIONS):
        raise bad(f"unknown compression code {compression}")
    field(1, 8)  # file_data_position: int64, any value is safe
    pos = field(2, 4)
    if pos is None:
        raise bad("no stream description")
    start = pos + u32(pos)
    n = u32(start)
    if start + 4 + n > len(buf):
        raise bad(f"the {n}-byte description does not fit in the header")
    try:
        text = buf[start + 4 : start + 4 + n].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"the stream description is not UTF-8 text (byte {exc.start} of it is 0x{exc.object[exc.start]:02X})") from None
    if "\0" in text:
        raise bad("the stream description holds a NUL character")
    pos = field(1, 8)
    data_table = struct.unpack_from("<q", buf, pos)[0] if pos is not None else -1
    return text, len(_AEDAT4_MAGIC) + 4 + length, compression, data_table


def _aedat4_packets(path: str, start: int, compression: int, data_table: int, stream_ids) -> None:
    """Walk the packet headers (int32 stream id, uint32 size) the way the decoder will, and
    refuse what would make it panic: a packet that runs past the end of the file, names a stream
    the description lacks, or (uncompressed) is too short to hold a flatbuffer identifier."""
    size = os.path.getsize(path)
    pos = start
    with open(path, "rb") as fh:
        while not (data_table > -1 and pos == data_table):
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 4:
                return  # where the decoder stops too
            if len(head) < 8:
                raise EventFileError(f"{path}: truncated AEDAT4 file: the packet header at byte {pos} is cut short")
            stream_id, length = struct.unpack("<II", head)
            if pos + 8 + length > size:
                raise EventFileError(
                    f"{path}: truncated AEDAT4 file: the packet at byte {pos} declares {length} bytes, "
                    f"the file ends {size - pos - 8} bytes later"
                )
            if stream_id not in stream_ids:
                raise EventFileError(f"{path}: corrupt AEDAT4 file: the packet at byte {pos} names stream {stream_id}, "
                                     f"which the description does not declare")
            if compression == 0 and length < 12:
                raise EventFileError(f"{path}: corrupt AEDAT4 file: the packet at byte {pos} is {length} bytes, "
                                     "too short for a packet")
            pos += 8 + length


class _CapturedStderr:
    """Send file descriptor 2 to a temporary file while the Rust decoder runs: a panic it raises
    (as Python's PanicException, the process survives) prints its report there, not on the
    user's terminal; the report becomes part of the error message instead."""

    def __enter__(self):
        import tempfile

        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read(4000).decode("utf-8", "replace")
        self.file.close()


def _open_aedat4(path: str, limits: ReadLimits) -> _Opened:
    _, start, compression, data_table = _aedat4_description(path)
    try:
        import aedat
    except ImportError as exc:
        raise EventFileError(
            f"{path}: reading .aedat4 needs the 'aedat' package, which is not installed (pip install aedat)"
        ) from exc
    decoder = aedat.Decoder(path)
    target, size = None, None
    for stream_id, stream in sorted(decoder.id_to_stream().items()):
        if stream.get("type") == "events":
            target = stream_id
            if stream.get("width") and stream.get("height"):
                size = (int(stream["width"]), int(stream["height"]), 2)
            break
    if target is None:
        raise EventFileError(f"{path}: the AEDAT4 description declares no event stream")
    _aedat4_packets(path, start, compression, data_table, set(decoder.id_to_stream()))

    def packets() -> Iterator[dict]:
        if compression == 0:  # every packet checked above: nothing left to panic on
            yield from decoder
            return
        while True:  # a compressed packet is checked only once decompressed, by the decoder
            captured = _CapturedStderr()
            try:
                with captured:
                    packet = next(decoder, None)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                panic = [line for line in captured.text.splitlines() if line.strip() and "panicked" not in line][:1]
                raise EventFileError(
                    f"{path}: cannot decode a {_AEDAT4_COMPRESSIONS[compression]} packet "
                    f"({type(exc).__name__}: {panic[0] if panic else exc})"
                ) from None
            if packet is None:
                return
            yield packet

    def chunks() -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        count = 0
        for packet in packets():
            if packet.get("stream_id") != target or "events" not in packet:
                continue
            raw = packet["events"]  # fields t (u64), x, y (u16), on (bool)
            pending.append(_fields(x=raw["x"], y=raw["y"], t=raw["t"], p=raw["on"]))
            count += len(raw)
            if count >= limits.chunk_events:
                yield np.concatenate(pending)
                pending, count = [], 0
        if pending:
            yield np.concatenate(pending)

    return _Opened(size or DVS128_SIZE, None, chunks())


# .npy / .npz / .h5 ---------------------------------------------------------------------


class _NpyHeader(NamedTuple):
    shape: tuple
    fortran: bool
    dtype: np.dtype
    nbytes: int


def _npy_header(fh, source: str) -> _NpyHeader:
    """Parse an .npy header from a binary stream (numpy's own parser; pickled data refused)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(fh, max_header_size=_MAX_HEADER_LINE)
    except (ValueError, OSError, SyntaxError, TypeError, EOFError) as exc:
        raise EventFileError(f"{source}: not a readable .npy array ({exc})") from None
    if dtype.hasobject:
        raise EventFileError(f"{source}: the array holds Python objects (dtype {dtype}); only numbers are read")
    n = 1
    for dim in shape:
        n *= int(dim)
    return _NpyHeader(tuple(int(d) for d in shape), bool(fortran), dtype, n * dtype.itemsize)


def _one_per_event(header: _NpyHeader, name: str, source: str) -> int:
    """Length of a field array stored on its own: 1-D, or 2-D with one axis of length 1."""
    shape = header.shape
    if len(shape) == 1 or (len(shape) == 2 and 1 in shape) or (len(shape) == 0):
        if header.dtype.names or header.dtype.subdtype is not None:
            raise EventFileError(f"{source}: array {name!r} has dtype {header.dtype}; it must hold plain numbers")
        return int(np.prod(shape, dtype=np.int64)) if shape else 1
    raise EventFileError(f"{source}: array {name!r} has shape {shape}; it must hold one number per event")


class _ArrayReader:
    """Reads an array stored as raw bytes after a header, a slice at a time, from a stream."""

    def __init__(self, fh, header: _NpyHeader, name: str, source: str) -> None:
        self.fh, self.header, self.name, self.source = fh, header, name, source
        self.left = header.nbytes // header.dtype.itemsize if header.dtype.itemsize else 0  # elements

    def read(self, n: int) -> np.ndarray:
        n = min(n, self.left)
        want = n * self.header.dtype.itemsize
        data = self.fh.read(want)
        if len(data) != want:
            raise EventFileError(f"{self.source}: array {self.name!r} is truncated (its data ends early)")
        self.left -= n
        return np.frombuffer(data, dtype=self.header.dtype)


def _open_npy(path: str, limits: ReadLimits) -> _Opened:
    with open(path, "rb") as fh:
        header = _npy_header(fh, path)
        offset = fh.tell()
    stored = os.path.getsize(path) - offset
    if header.nbytes > stored:
        raise EventFileError(f"{path}: truncated .npy: its header declares {header.nbytes} bytes of data, the file holds {stored}")
    if header.dtype.names:
        _check_fields(header.dtype, path)
        if len(header.shape) != 1:
            raise EventFileError(f"{path}: events must be a 1-D array, got shape {header.shape}")
        layout = "events"
    elif len(header.shape) == 2 and header.shape[1] == 4 and header.dtype.kind in "iuf":
        layout = "gesture"  # tonic's preprocessed DVS128-Gesture sample: columns x, y, p, t[ms]
    else:
        raise EventFileError(
            f"{path}: .npy must hold a structured array with fields x, y, t, p or an N x 4 DVS128-Gesture "
            f"array (x, y, p, t[ms]); got dtype {header.dtype} and shape {header.shape}"
        )

    def rows() -> Iterator[np.ndarray]:
        n_rows, step = header.shape[0], limits.chunk_events
        if layout == "gesture" and header.fortran:  # column-major: slice a read-only map
            mapped = np.memmap(path, header.dtype, "r", offset=offset, shape=header.shape, order="F")
            for i in range(0, n_rows, step):
                yield np.array(mapped[i : i + step])
            return
        width = 4 if layout == "gesture" else 1
        with open(path, "rb") as fh:
            fh.seek(offset)
            reader = _ArrayReader(fh, header, "events", path)
            for _ in range(0, n_rows, step):
                block = reader.read(step * width)
                yield block.reshape(-1, 4) if layout == "gesture" else block

    def chunks() -> Iterator[np.ndarray]:
        for block in rows():
            if layout == "events":
                yield block
                continue
            t = block[:, 3]
            if block.dtype.kind == "f":
                t_us = t.astype(np.float64) * 1000.0
            else:
                t_ms = _as_int(t, "t", path)
                if len(t_ms) and (t_ms.max() > _INT64_MAX // 1000 or t_ms.min() < -(_INT64_MAX // 1000)):
                    raise EventFileError(f"{path}: column t (ms) holds values whose microseconds overflow int64")
                t_us = t_ms * 1000
            yield _fields(x=block[:, 0], y=block[:, 1], t=t_us, p=block[:, 2])

    return _Opened(None if layout == "events" else DVS128_SIZE, None, chunks())


def _check_expansion(source: str, declared: int, stored: int, limits: ReadLimits, what: str) -> None:
    if declared > max(MIN_BOMB_BYTES, limits.max_expansion * max(stored, 1)):
        raise DecompressedSizeError(
            f"{source}: {what} declare {declared / 1e6:,.1f} MB of arrays stored in {stored / 1e6:,.3f} MB "
            f"({declared / max(stored, 1):,.0f}-fold; the limit is {limits.max_expansion:g}-fold, which stops "
            f"decompression bombs); if the file is genuine, raise it (--max-expansion, ReadLimits.max_expansion)"
        )


def _field_arrays(layout: str, readers: dict[str, _ArrayReader], n: int, limits: ReadLimits) -> Iterator[np.ndarray]:
    """Chunks of raw events from per-field readers (layout 'fields') or one structured reader."""
    for _ in range(0, n, limits.chunk_events):
        if layout == "events":
            yield readers["events"].read(limits.chunk_events)
        else:
            yield _fields(**{k: readers[k].read(limits.chunk_events) for k in ("x", "y", "t", "p")})


def _pick_layout(source: str, headers: dict[str, _NpyHeader], keys) -> tuple[str, int]:
    """'events' (one structured array) or 'fields' (x, y, t, p), and the number of events."""
    if "events" in headers and headers["events"].dtype.names:
        h = headers["events"]
        _check_fields(h.dtype, source)
        if len(h.shape) != 1:
            raise EventFileError(f"{source}: events must be a 1-D array, got shape {h.shape}")
        return "events", h.shape[0]
    if all(k in headers for k in ("x", "y", "t", "p")):
        lengths = {k: _one_per_event(headers[k], k, source) for k in ("x", "y", "t", "p")}
        if len(set(lengths.values())) != 1:
            raise EventFileError(f"{source}: arrays x, y, t, p have different lengths {lengths}")
        return "fields", lengths["x"]
    raise EventFileError(
        f"{source}: found neither arrays x, y, t, p nor a structured 'events' array (keys: {sorted(keys)})"
    )


def _open_npz(path: str, limits: ReadLimits) -> _Opened:
    archive = zipfile.ZipFile(path)
    try:
        members = {}
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            members.setdefault(key, info)
        headers = {}
        for key in ("events", "x", "y", "t", "p"):
            if key in members:
                with archive.open(members[key]) as fh:
                    headers[key] = _npy_header(fh, f"{path} (array {key!r})")
                if headers[key].nbytes > members[key].file_size:
                    raise EventFileError(
                        f"{path}: array {key!r} declares {headers[key].nbytes} bytes but its zip member holds {members[key].file_size}"
                    )
        layout, n = _pick_layout(path, headers, members)
        used = ["events"] if layout == "events" else ["x", "y", "t", "p"]
        _check_expansion(
            path, sum(members[k].file_size for k in used), sum(members[k].compress_size for k in used), limits, "its members"
        )
        size = None
        if "sensor_size" in members:
            info = members["sensor_size"]
            if info.file_size > 4096:
                raise EventFileError(f"{path}: array 'sensor_size' is {info.file_size} bytes; it must hold 2 or 3 numbers")
            size = np.load(io.BytesIO(archive.read(info)), allow_pickle=False)
    except BaseException:
        archive.close()
        raise

    def chunks() -> Iterator[np.ndarray]:
        with archive:
            streams = {k: archive.open(members[k]) for k in used}
            readers = {}
            for k, fh in streams.items():
                _npy_header(fh, path)  # skip the header again
                readers[k] = _ArrayReader(fh, headers[k], k, path)
            try:
                yield from _field_arrays(layout, readers, n, limits)
            finally:
                for fh in streams.values():
                    fh.close()

    return _Opened(size, None, chunks())


def _h5_slice(ds, start: int, stop: int) -> np.ndarray:
    """Values ``start:stop`` of a dataset holding one number per event (shape (N,), (N, 1), (1, N) or ())."""
    if ds.ndim == 0:
        return np.asarray(ds[()]).reshape(1)[start:stop]
    if ds.ndim == 2:
        return ds[start:stop, 0] if ds.shape[1] == 1 else ds[0, start:stop]
    return ds[start:stop]


def _open_h5(path: str, limits: ReadLimits) -> _Opened:
    import h5py

    fh = h5py.File(path, "r")
    try:
        group = fh["events"] if "events" in fh and isinstance(fh["events"], h5py.Group) else fh
        keys = set(group.keys())
        datasets, headers = {}, {}
        for key in ("events", "x", "y", "t", "p"):
            if key in keys and isinstance(group[key], h5py.Dataset):
                ds = group[key]
                if ds.dtype.hasobject or ds.dtype.kind not in "iufbV":
                    raise EventFileError(f"{path}: dataset {key!r} has dtype {ds.dtype}; it must hold numbers")
                datasets[key] = ds
                headers[key] = _NpyHeader(tuple(ds.shape or ()), False, ds.dtype, int(ds.size) * ds.dtype.itemsize)
        layout, n = _pick_layout(path, headers, keys)
        used = ["events"] if layout == "events" else ["x", "y", "t", "p"]
        _check_expansion(
            path,
            sum(headers[k].nbytes for k in used),
            sum(int(datasets[k].id.get_storage_size()) for k in used),
            limits,
            "its datasets",
        )
        size = fh.attrs.get("sensor_size")
        if size is None and "sensor_size" in fh and isinstance(fh["sensor_size"], h5py.Dataset):
            if fh["sensor_size"].size > 8:
                raise EventFileError(f"{path}: dataset 'sensor_size' holds {fh['sensor_size'].size} values; it must hold 2 or 3")
            size = fh["sensor_size"][()]
    except BaseException:
        fh.close()
        raise

    def chunks() -> Iterator[np.ndarray]:
        with fh:
            for start in range(0, n, limits.chunk_events):
                stop = min(n, start + limits.chunk_events)
                if layout == "events":
                    yield datasets["events"][start:stop]
                else:
                    yield _fields(**{k: _h5_slice(datasets[k], start, stop) for k in ("x", "y", "t", "p")})

    return _Opened(size, None, chunks())


# .raw / .dat ---------------------------------------------------------------------------


def _prophesee_header(path: str) -> tuple[dict[str, str], int]:
    """The '%'-prefixed text header: ({lowercased key: value}, offset of the binary data)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        offset = 0
        while True:
            line = fh.readline(_MAX_HEADER_LINE + 1)
            if not line.startswith(b"%"):
                break
            if len(line) > _MAX_HEADER_LINE or offset + len(line) > _MAX_HEADER_BYTES:
                raise EventFileError(f"{path}: the '%' text header runs over {_MAX_HEADER_LINE // 1024} KiB a line "
                                     f"or {_MAX_HEADER_BYTES // 1024} KiB in all (a corrupt file?)")
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


def prophesee_encoding(header: dict[str, str]) -> tuple[str | None, str, str]:
    """A .raw header's CD encoding: ("evt3" | "evt2" | None, the `evt` field, the `format` name)."""
    version = header.get("evt", "")
    fmt = header.get("format", "").split(";")[0].strip().upper()
    if version.startswith("3") or fmt == "EVT3":
        return "evt3", version, fmt
    if version.startswith("2") or fmt == "EVT2":
        return "evt2", version, fmt
    return None, version, fmt


def _prophesee_size(header: dict[str, str]) -> tuple | None:
    if "geometry" in header:
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", header["geometry"])
        if match:
            return (int(match.group(1)), int(match.group(2)), 2)
    if "width" in header and "height" in header:
        if re.fullmatch(r"\d{1,6}", header["width"]) and re.fullmatch(r"\d{1,6}", header["height"]):
            return (int(header["width"]), int(header["height"]), 2)
    return None


@dataclass(frozen=True)
class _Evt3State:
    """Where an EVT3 decoder stands between two pieces of a file."""

    high_raw: int = -1  # the last TIME_HIGH's 12 bits (-1: none yet)
    wraps: int = 0  # 24-bit time-base wraps counted so far
    low: int = 0  # the last TIME_LOW
    y: int = 0  # the last ADDR_Y
    base_x: int = -1  # the vector base x, advanced past the vectors since (-1: no base yet)
    base_p: int = 0


def _decode_evt3_chunk(words: np.ndarray, state: _Evt3State) -> tuple[np.ndarray, _Evt3State]:
    """Decode Prophesee EVT 3.0 16-bit words (vectorized), starting from ``state``; returns the
    events and the state after the words, so a file decodes piece by piece as in one go.

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

    def last(mask: np.ndarray, values: np.ndarray, before: int) -> np.ndarray:
        """At each word, the value of the latest word matching mask (`before` before the first)."""
        pos = np.maximum.accumulate(np.where(mask, idx, -1))
        return np.where(pos >= 0, values[np.maximum(pos, 0)], before)

    is_high = kind == 0x8
    high = value.copy()
    high_vals = value[is_high]
    if state.high_raw >= 0:
        wraps = np.cumsum(np.diff(np.concatenate([[state.high_raw], high_vals])) < 0)
    else:
        wraps = np.concatenate([[0], np.cumsum(np.diff(high_vals) < 0)])[: len(high_vals)]
    high[is_high] = high_vals + (state.wraps + wraps) * 4096
    high_before = state.high_raw + state.wraps * 4096 if state.high_raw >= 0 else 0
    is_low = kind == 0x6
    t = (last(is_high, high, high_before) << 12) | last(is_low, value, state.low)
    y = last(kind == 0x0, value & 0x7FF, state.y)

    single = kind == 0x2
    parts_pos = [idx[single]]
    parts_bit = [np.zeros(int(single.sum()), dtype=np.int64)]
    parts_x = [value[single] & 0x7FF]
    parts_p = [(value[single] >> 11) & 1]

    is_base = kind == 0x3
    is_vec = (kind == 0x4) | (kind == 0x5)
    width = np.where(kind == 0x4, 12, np.where(kind == 0x5, 8, 0))
    done = np.cumsum(width) - width  # vector width consumed before each word
    base_pos = np.maximum.accumulate(np.where(is_base, idx, -1))
    if is_vec.any():
        base_ok = base_pos >= 0
        bp = np.maximum(base_pos, 0)
        carried = state.base_x + done if state.base_x >= 0 else np.zeros_like(done)
        x0 = np.where(base_ok, (value[bp] & 0x7FF) + done - done[bp], carried)
        pol = np.where(base_ok, (value[bp] >> 11) & 1, state.base_p)
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
    out = np.empty(len(pos), dtype=[("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])
    out["x"] = np.concatenate(parts_x)[order]
    out["y"] = y[pos]
    out["t"] = t[pos]
    out["p"] = np.concatenate(parts_p)[order]

    total = int(width.sum())
    if is_base.any():
        b = int(np.flatnonzero(is_base)[-1])
        base_x, base_p = int(value[b] & 0x7FF) + total - int(done[b]), int(value[b] >> 11) & 1
    else:
        base_x = state.base_x + total if state.base_x >= 0 else -1
        base_p = state.base_p
    lows, ys = value[is_low], value[kind == 0x0] & 0x7FF
    after = _Evt3State(
        high_raw=int(high_vals[-1]) if len(high_vals) else state.high_raw,
        wraps=state.wraps + (int(wraps[-1]) if len(high_vals) else 0),
        low=int(lows[-1]) if len(lows) else state.low,
        y=int(ys[-1]) if len(ys) else state.y,
        base_x=base_x,
        base_p=base_p,
    )
    return out, after


def _decode_evt3(words: np.ndarray) -> np.ndarray:
    """All ``EVENT_DTYPE`` events of EVT 3.0 words decoded in one go (see :func:`_decode_evt3_chunk`)."""
    raw, _ = _decode_evt3_chunk(words, _Evt3State())
    out = np.empty(len(raw), dtype=EVENT_DTYPE)
    for name in ("x", "y", "t", "p"):
        out[name] = raw[name]
    return out


def _decode_evt2_chunk(words: np.ndarray, high: int) -> tuple[np.ndarray, int]:
    """Prophesee EVT 2.0 32-bit words from the last TIME_HIGH ``high`` on: (events, new high).
    Types (bits 31..28): 0x0 CD_OFF / 0x1 CD_ON (t low bits 27..22, x 21..11, y 10..0), 0x8
    EVT_TIME_HIGH (t >> 6 in bits 27..0); others carry no CD event."""
    w = np.asarray(words, dtype=np.uint32).astype(np.int64)
    kind = w >> 28
    is_high = kind == 0x8
    idx = np.arange(len(w))
    pos = np.maximum.accumulate(np.where(is_high, idx, -1))
    highs = np.where(pos >= 0, w[np.maximum(pos, 0)] & 0x0FFFFFFF, high)
    cd = kind <= 0x1
    out = _fields(x=(w[cd] >> 11) & 0x7FF, y=w[cd] & 0x7FF, t=(highs[cd] << 6) | ((w[cd] >> 22) & 0x3F), p=kind[cd])
    return out, int(w[is_high][-1] & 0x0FFFFFFF) if is_high.any() else high


def _open_raw(path: str, limits: ReadLimits) -> _Opened:
    header, offset = _prophesee_header(path)
    encoding, version, fmt = prophesee_encoding(header)
    payload = os.path.getsize(path) - offset
    size = _prophesee_size(header)
    if encoding == "evt3":
        if payload % 2:
            raise EventFileError(f"{path}: truncated EVT3 data: {payload} bytes is not a multiple of 2")

        def evt3() -> Iterator[np.ndarray]:
            state = _Evt3State()
            for data in _blocks(path, offset, 2, limits.chunk_events):
                events, state = _decode_evt3_chunk(np.frombuffer(data, "<u2"), state)
                yield events

        return _Opened(size, None, evt3())
    if encoding == "evt2":
        if payload % 4:
            raise EventFileError(f"{path}: truncated EVT2 data: {payload} bytes is not a multiple of 4")

        def evt2() -> Iterator[np.ndarray]:
            high = 0
            for data in _blocks(path, offset, 4, limits.chunk_events):
                events, high = _decode_evt2_chunk(np.frombuffer(data, "<u4"), high)
                yield events

        return _Opened(size, None, evt2())
    raise EventFileError(
        f"{path}: unknown Prophesee .raw encoding (header says evt={version or '?'}, format={fmt or '?'}); "
        "EVT 2.0 and EVT 3.0 are supported"
    )


def _open_dat(path: str, limits: ReadLimits) -> _Opened:
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

    def chunks() -> Iterator[np.ndarray]:
        last, wraps = -1, 0
        for data in _blocks(path, offset + 2, 8, limits.chunk_events):
            rec = np.frombuffer(data, "<u4").reshape(-1, 2).astype(np.int64)
            ts, w = rec[:, 0], rec[:, 1]
            # a timestamp below the one before: the 32-bit counter wrapped (expelliarmus' reading)
            back = np.diff(np.concatenate([[last if last >= 0 else ts[0]], ts])) < 0
            count = wraps + np.cumsum(back)
            last, wraps = int(ts[-1]), int(count[-1])
            yield _fields(x=w & 0x3FFF, y=(w >> 14) & 0x3FFF, t=ts + (count << 32), p=(w >> 28) & 0xF)

    return _Opened(_prophesee_size(header), None, chunks())


_READERS: dict[str, Callable[[str, ReadLimits], _Opened]] = {
    ".bin": _open_atis,
    ".aedat4": _open_aedat4,
    ".npy": _open_npy,
    ".npz": _open_npz,
    ".h5": _open_h5,
    ".hdf5": _open_h5,
    ".raw": _open_raw,
    ".dat": _open_dat,
}


# --------------------------------------------------------------------------- streaming


def _decode_error(source: str, suffix: str, exc: BaseException) -> EventFileError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return EventFileError(f"{source}: cannot decode {suffix} file ({type(exc).__name__}{': ' + text if text else ''})")


_PASS = (EventFileError, KeyboardInterrupt, SystemExit, GeneratorExit)


class EventStream:
    """An opened event file whose events are read a chunk at a time (see :func:`open_events`).

    ``chunks()`` may be iterated once. While it runs it counts the events and their extent, and
    notes whether time ever goes back (``sorted``); after it ends ``sensor_size`` is known.
    """

    def __init__(self, path: str, opened: _Opened, given_size: tuple | None) -> None:
        self.path = path
        self._opened = opened
        self.declared_size = given_size if given_size is not None else opened.size
        self.count = 0
        self.max_x = self.max_y = -1
        self.sorted = True
        self.t_min: int | None = None
        self.t_max: int | None = None
        self.on = 0
        self._last_t: int | None = None
        self._done = False

    def chunks(self) -> Iterator[np.ndarray]:
        """Checked ``[n]`` ``EVENT_DTYPE`` chunks in file order (not sorted here)."""
        suffix = Path(self.path).suffix.lower()
        width, height = (self.declared_size[0], self.declared_size[1]) if self.declared_size else (2**16, 2**16)
        raw = iter(self._opened.chunks)
        while True:
            try:
                block = next(raw, None)
                if block is None:
                    break
                chunk = _check_chunk(block, width, height, self.path, self.count)
            except _PASS:
                raise
            except BaseException as exc:  # numpy, zipfile, h5py, aedat (Rust panics too), MemoryError
                raise _decode_error(self.path, suffix, exc) from None
            if len(chunk) == 0:
                continue
            t = chunk["t"]
            if (self._last_t is not None and t[0] < self._last_t) or (len(t) > 1 and (t[1:] < t[:-1]).any()):
                self.sorted = False
            self._last_t = int(t[-1])
            lo, hi = int(t.min()), int(t.max())
            self.t_min = lo if self.t_min is None else min(self.t_min, lo)
            self.t_max = hi if self.t_max is None else max(self.t_max, hi)
            self.count += len(chunk)
            self.on += int(np.count_nonzero(chunk["p"]))
            self.max_x = max(self.max_x, int(chunk["x"].max()))
            self.max_y = max(self.max_y, int(chunk["y"].max()))
            yield chunk
        self._done = True

    @property
    def sensor_size(self) -> tuple[int, int, int]:
        """The size given or stated by the file; else the fitting default (N-MNIST for .bin) when
        every event fits it; else max coordinate + 1. Known once ``chunks()`` has ended."""
        if self.declared_size is not None:
            return self.declared_size
        if not self._done:
            raise RuntimeError("sensor_size of a file without a stated size is known once chunks() has ended")
        fits = self._opened.fits
        if fits is not None and self.max_x < fits[0] and self.max_y < fits[1]:
            return fits
        if self.count == 0:
            return (1, 1, 2)
        return (self.max_x + 1, self.max_y + 1, 2)


def open_events(path: str | os.PathLike, sensor_size=None, limits: ReadLimits | None = None) -> EventStream:
    """Open an event file for reading in chunks (format chosen by suffix, see the module docstring).

    The header, declared sizes and limits are checked here; events are decoded and checked as
    ``EventStream.chunks()`` is iterated.

    Args:
        path: the file.
        sensor_size: ``(W, H)`` or ``(W, H, 2)``; overrides what the file says or implies.
        limits: :class:`ReadLimits` (default: ``ReadLimits()``).

    Raises:
        EventFileError: missing, unknown, corrupt or truncated file (the message names the file);
            DecompressedSizeError for a container that declares far more than it stores.
    """
    source = str(path)
    suffix = Path(source).suffix.lower()
    limits = limits or ReadLimits()
    if suffix not in _READERS:
        raise EventFileError(f"{source}: unsupported suffix {suffix!r}; expected one of {', '.join(READ_SUFFIXES)}")
    if not os.path.isfile(source):
        raise EventFileError(f"{source}: no such file" if not os.path.exists(source) else f"{source}: not a file")
    given = _normalize_sensor_size(sensor_size, source) if sensor_size is not None else None
    try:
        opened = _READERS[suffix](source, limits)
        stored = _normalize_sensor_size(opened.size, source) if opened.size is not None else None
    except _PASS:
        raise
    except BaseException as exc:  # decoder errors of numpy, zipfile, h5py, aedat
        raise _decode_error(source, suffix, exc) from None
    return EventStream(source, opened._replace(size=stored), given)


def read_events(path: str | os.PathLike, sensor_size=None, limits: ReadLimits | None = None) -> Recording:
    """Read a whole event file into memory (format chosen by suffix, see the module docstring).

    Args:
        path: the file.
        sensor_size: ``(W, H)`` or ``(W, H, 2)``; overrides what the file says or implies.
        limits: :class:`ReadLimits` (default: ``ReadLimits()``).

    Returns:
        a :class:`Recording` with ``EVENT_DTYPE`` events sorted by time (stable-sorted, with a
        warning, when the file's are not).

    Raises:
        EventFileError: missing, unknown, corrupt or truncated file, or invalid events; the
            message names the file.
    """
    stream = open_events(path, sensor_size, limits)
    pieces = list(stream.chunks())
    events = np.concatenate(pieces) if pieces else np.empty(0, EVENT_DTYPE)
    del pieces
    if not stream.sorted:
        warnings.warn(f"{stream.path}: timestamps are not sorted; stable-sorting the events by time", stacklevel=2)
        events = events[np.argsort(events["t"], kind="stable")]
    return Recording(events=events, sensor_size=stream.sensor_size, path=stream.path)


def scan_events(path: str | os.PathLike, sensor_size=None, limits: ReadLimits | None = None) -> dict:
    """:func:`summarize` of a file, read a chunk at a time (memory does not grow with its length).
    Unsorted timestamps are reported with a warning; t_first/t_last are then the earliest and
    latest."""
    stream = open_events(path, sensor_size, limits)
    for _ in stream.chunks():
        pass
    if not stream.sorted:
        warnings.warn(f"{stream.path}: timestamps are not sorted (t first/last are the earliest/latest)", stacklevel=2)
    return _summary(stream.path, stream.count, stream.sensor_size, stream.t_min, stream.t_max, stream.on)


def time_windows(chunks, window_us: int, source: str = "<events>") -> Iterator[np.ndarray]:
    """Consecutive windows ``[t0 + k*w, t0 + (k+1)*w)`` from the first event on, of time-sorted
    events arriving in chunks; empty windows inside the recording are kept (a sensor that saw
    nothing). The windows of ``tmkt.runtime.classifier.split_windows`` on the joined events,
    holding one window and one chunk at a time.

    Raises:
        EventOrderError: a timestamp goes back (sort with :func:`read_events` instead).
    """
    if window_us <= 0:
        raise ValueError(f"window must be > 0 us, got {window_us}")
    empty = np.empty(0, EVENT_DTYPE)
    t0: int | None = None
    k = 0  # index of the window being filled
    pending: list[np.ndarray] = []
    last_t: int | None = None
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        t = chunk["t"]
        if (last_t is not None and int(t[0]) < last_t) or (len(t) > 1 and (t[1:] < t[:-1]).any()):
            raise EventOrderError(f"{source}: timestamps are not sorted; windows need time-sorted events")
        last_t = int(t[-1])
        if t0 is None:
            t0 = int(t[0])
        start = 0
        while start < len(chunk):
            end = t0 + (k + 1) * window_us  # exact (Python int)
            if end > last_t:
                pending.append(chunk[start:])
                break
            cut = max(start, int(np.searchsorted(t, end, side="left")))
            pending.append(chunk[start:cut])
            yield np.concatenate(pending) if len(pending) > 1 else pending[0].copy()
            pending = []
            k += 1
            start = cut
            if start < len(chunk):
                for _ in range(k, (int(t[start]) - t0) // window_us):
                    yield empty
                    k += 1
    if t0 is not None:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0].copy()


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


def _summary(path, n: int, sensor_size, t_first: int | None, t_last: int | None, on: int) -> dict:
    duration = (t_last - t_first) / 1e6 if n else 0.0
    return {
        "path": path,
        "events": n,
        "sensor_size": [int(v) for v in sensor_size],
        "t_first_us": t_first,
        "t_last_us": t_last,
        "duration_s": duration,
        "rate_ev_s": n / duration if duration > 0 else 0.0,
        "on_events": on,
        "off_events": n - on,
        "on_fraction": on / n if n else None,
    }


def summarize(rec: Recording) -> dict:
    """Facts about a recording, JSON-ready.

    Keys: path, events, sensor_size ``[W, H, 2]``, t_first_us, t_last_us (None when empty),
    duration_s, rate_ev_s (events / duration; 0 when the duration is 0), on_events,
    off_events, on_fraction (ON / all; None when empty). :func:`scan_events` gives the same
    for a file, reading it a chunk at a time.
    """
    ev = rec.events
    n = int(len(ev))
    on = int(np.count_nonzero(ev["p"])) if n else 0
    t_first = int(ev["t"][0]) if n else None
    t_last = int(ev["t"][-1]) if n else None
    return _summary(rec.path, n, rec.sensor_size, t_first, t_last, on)
