"""Incremental decoders for files read while they grow (`tmkt infer --follow`).

Each decoder takes the file's bytes in pieces of any size (`feed(data) -> events`) and returns
the events those bytes complete, carrying partial words, lines and decoder state over;
`finish()` at the end returns what a last partial line held (or raises on a partial word):

- Prophesee `.raw` EVT 3.0 (16-bit words) and EVT 2.0 (32-bit words): the chunk decoders of
  `tmkt.data.events` that the whole-file reader uses, their state (time high and low, row,
  vector base and polarity, time-base wraps; EVT2's last TIME_HIGH) carried from piece to piece;
- text (`.csv`, `.txt`): `t,x,y,p` per line (commas or spaces; `#` comments; t in µs).

The whole-file readers stay in `tmkt.data.events` (`read_events`); the tests check that these
decoders, fed a file in random pieces, give exactly what `read_events` gives on the whole file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tmkt.data.events import EVENT_DTYPE, _decode_evt2_chunk, _decode_evt3_chunk, _Evt3State, prophesee_encoding
from tmkt.errors import TmktError

__all__ = ["FOLLOW_SUFFIXES", "FollowError", "decoder_for"]

FOLLOW_SUFFIXES = (".raw", ".csv", ".txt")
_T_MAX = 2**63 - 1
_XY_MAX = 2**16 - 1


class FollowError(TmktError, ValueError):
    """A followed file holds something its decoder cannot read."""


class _Words:
    """Whole words of `size` bytes, decoded by `decode(words, state) -> (events, state)`: the
    chunk decoders of `tmkt.data.events`, which carry their state from piece to piece."""

    def __init__(self, source: str, name: str, dtype: str, decode, state) -> None:
        self.source, self.name, self.dtype = source, name, np.dtype(dtype)
        self.decode, self.state = decode, state
        self.rest = b""

    def feed(self, data: bytes) -> np.ndarray:
        data = self.rest + data
        n = len(data) // self.dtype.itemsize * self.dtype.itemsize
        self.rest = data[n:]
        if n == 0:
            return np.empty(0, EVENT_DTYPE)
        raw, self.state = self.decode(np.frombuffer(data[:n], self.dtype), self.state)
        out = np.empty(len(raw), EVENT_DTYPE)
        for field in ("x", "y", "t", "p"):
            out[field] = raw[field]
        return out

    def finish(self) -> np.ndarray:
        if self.rest:
            raise FollowError(f"{self.source}: ends inside a {8 * self.dtype.itemsize}-bit {self.name} word")
        return np.empty(0, EVENT_DTYPE)


def _evt3(source: str) -> _Words:
    return _Words(source, "EVT3", "<u2", _decode_evt3_chunk, _Evt3State())


def _evt2(source: str) -> _Words:
    return _Words(source, "EVT2", "<u4", _decode_evt2_chunk, 0)


class _Raw:
    """Prophesee .raw: waits for the whole '%' header, then hands the data to EVT2 or EVT3."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.head = b""
        self.inner: _Words | None = None

    def feed(self, data: bytes) -> np.ndarray:
        if self.inner is not None:
            return self.inner.feed(data)
        self.head += data
        fields: dict[str, str] = {}
        pos = 0
        while pos < len(self.head):
            if self.head[pos : pos + 1] != b"%":
                break
            end = self.head.find(b"\n", pos)
            if end < 0:
                return np.empty(0, EVENT_DTYPE)  # a header line still being written
            text = self.head[pos + 1 : end].decode("latin-1").strip()
            pos = end + 1
            if text.lower() == "end":
                break
            key, _, value = text.partition(" ")
            fields[key.lower()] = value.strip()
        else:
            return np.empty(0, EVENT_DTYPE)  # only header so far
        encoding, version, fmt = prophesee_encoding(fields)
        if encoding == "evt3":
            self.inner = _evt3(self.source)
        elif encoding == "evt2":
            self.inner = _evt2(self.source)
        else:
            raise FollowError(f"{self.source}: unknown Prophesee .raw encoding (evt={version or '?'}, "
                              f"format={fmt or '?'}); EVT 2.0 and EVT 3.0 can be followed")
        data, self.head = self.head[pos:], b""
        return self.inner.feed(data)

    def finish(self) -> np.ndarray:
        return np.empty(0, EVENT_DTYPE) if self.inner is None else self.inner.finish()


def _integer(text: str) -> int:
    """An integer field of a text event: exact for integers (a float loses digits past 2**53),
    else a float's whole part ("12.0", "1e6")."""
    try:
        return int(text)
    except ValueError:
        return int(float(text))


class _Text:
    def __init__(self, source: str) -> None:
        self.source = source
        self.rest = b""
        self.line = 0

    def feed(self, data: bytes) -> np.ndarray:
        data = self.rest + data
        cut = data.rfind(b"\n") + 1
        self.rest = data[cut:]
        rows = []
        for raw in data[:cut].decode("utf-8", "replace").splitlines():
            self.line += 1
            text = raw.split("#", 1)[0].replace(",", " ").split()
            if not text:
                continue
            try:
                t, x, y, p = (_integer(v) for v in text)
            except (ValueError, OverflowError):  # not numbers, NaN, or infinite
                raise FollowError(f"{self.source}: line {self.line}: expected t,x,y,p, got {raw.strip()!r}") from None
            if x < 0 or y < 0 or t < 0:
                raise FollowError(f"{self.source}: line {self.line}: negative value in {raw.strip()!r}")
            if t > _T_MAX or x > _XY_MAX or y > _XY_MAX:  # what EVENT_DTYPE holds (int64 µs, uint16 pixels)
                raise FollowError(f"{self.source}: line {self.line}: value out of range in {raw.strip()!r} "
                                  f"(t <= 2**63 - 1 µs, x and y <= {_XY_MAX})")
            rows.append((x, y, t, int(p > 0)))
        return np.array(rows, EVENT_DTYPE) if rows else np.empty(0, EVENT_DTYPE)

    def finish(self) -> np.ndarray:
        """Events of a last line without its newline (the writer stopped mid-line: taken as is)."""
        return self.feed(b"\n") if self.rest.strip() else np.empty(0, EVENT_DTYPE)


def decoder_for(path: Path):
    """The incremental decoder for `path`'s suffix (see the module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".raw":
        return _Raw(str(path))
    if suffix in (".csv", ".txt"):
        return _Text(str(path))
    raise FollowError(f"{path}: --follow reads {' '.join(FOLLOW_SUFFIXES)} files (Prophesee EVT2/EVT3, or t,x,y,p text)")
