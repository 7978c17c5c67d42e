"""Incremental decoders for files read while they grow (`tmkt infer --follow`).

Each decoder takes the file's bytes in pieces of any size (`feed(data) -> events`) and returns
the events those bytes complete, carrying partial words, lines and decoder state over;
`finish()` at the end returns what a last partial line held (or raises on a partial word):

- Prophesee `.raw` EVT 3.0: the 16-bit words of `tmkt.data.events._decode_evt3` (its decoder,
  fed the new words behind a prefix that restores the state the previous piece left: time high
  and low, row, vector base and polarity; the 24-bit time-base wraps are carried);
- Prophesee `.raw` EVT 2.0: 32-bit words, CD events with a 6-bit time low under the last
  TIME_HIGH (28 bits);
- text (`.csv`, `.txt`): `t,x,y,p` per line (commas or spaces; `#` comments; t in µs).

The whole-file readers stay in `tmkt.data.events` (`read_events`); the tests check that these
decoders, fed a file in random pieces, give exactly what `read_events` gives on the whole file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tmkt.data.events import EVENT_DTYPE
from tmkt.errors import TmktError

__all__ = ["FOLLOW_SUFFIXES", "FollowError", "decoder_for"]

FOLLOW_SUFFIXES = (".raw", ".csv", ".txt")
_T_MAX = 2**63 - 1
_XY_MAX = 2**16 - 1


class FollowError(TmktError, ValueError):
    """A followed file holds something its decoder cannot read."""


class _Evt3:
    def __init__(self, source: str) -> None:
        self.source = source
        self.rest = b""
        self.prefix = np.empty(0, "<u2")
        self.wraps = 0

    def feed(self, data: bytes) -> np.ndarray:
        from tmkt.data.events import _decode_evt3

        data = self.rest + data
        n = len(data) // 2 * 2
        self.rest = data[n:]
        if n == 0:
            return np.empty(0, EVENT_DTYPE)
        words = np.concatenate([self.prefix, np.frombuffer(data[:n], "<u2")])
        ev = _decode_evt3(words)  # the prefix holds state words only: no events of its own
        kind = words >> 12
        highs = (words[kind == 0x8] & 0x0FFF).astype(np.int64)
        if len(ev):
            ev["t"] += self.wraps * (4096 << 12)
        self.wraps += int((np.diff(highs) < 0).sum())
        self.prefix = self._state(words, kind)
        return ev

    @staticmethod
    def _state(words: np.ndarray, kind: np.ndarray) -> np.ndarray:
        """Words that put a fresh decoder where `words` left it (last time high/low, row, base x)."""
        keep = []
        for k in (0x8, 0x6, 0x0):
            pos = np.flatnonzero(kind == k)
            if len(pos):
                keep.append(int(words[pos[-1]]))
        base = np.flatnonzero(kind == 0x3)
        if len(base):
            b = int(base[-1])
            after = kind[b + 1 :]
            x = (int(words[b]) & 0x7FF) + 12 * int((after == 0x4).sum()) + 8 * int((after == 0x5).sum())
            keep.append(0x3000 | (int(words[b]) & 0x800) | (x & 0x7FF))
        return np.asarray(keep, "<u2")

    def finish(self) -> np.ndarray:
        if self.rest:
            raise FollowError(f"{self.source}: ends inside a 16-bit EVT3 word")
        return np.empty(0, EVENT_DTYPE)


class _Evt2:
    def __init__(self, source: str) -> None:
        self.source = source
        self.rest = b""
        self.high = 0

    def feed(self, data: bytes) -> np.ndarray:
        data = self.rest + data
        n = len(data) // 4 * 4
        self.rest = data[n:]
        w = np.frombuffer(data[:n], "<u4").astype(np.int64)
        kind = w >> 28
        is_high = kind == 0x8
        idx = np.arange(len(w))
        pos = np.maximum.accumulate(np.where(is_high, idx, -1))
        high = np.where(pos >= 0, w[np.maximum(pos, 0)] & 0x0FFFFFFF, self.high)
        if is_high.any():
            self.high = int(w[is_high][-1] & 0x0FFFFFFF)
        cd = (kind == 0x0) | (kind == 0x1)
        out = np.empty(int(cd.sum()), EVENT_DTYPE)
        out["t"] = (high[cd] << 6) | ((w[cd] >> 22) & 0x3F)
        out["x"] = (w[cd] >> 11) & 0x7FF
        out["y"] = w[cd] & 0x7FF
        out["p"] = kind[cd]
        return out

    def finish(self) -> np.ndarray:
        if self.rest:
            raise FollowError(f"{self.source}: ends inside a 32-bit EVT2 word")
        return np.empty(0, EVENT_DTYPE)


class _Raw:
    """Prophesee .raw: waits for the whole '%' header, then hands the data to EVT2 or EVT3."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.head = b""
        self.inner: _Evt2 | _Evt3 | None = None

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
        version = fields.get("evt", "")
        fmt = fields.get("format", "").split(";")[0].strip().upper()
        if version.startswith("3") or fmt == "EVT3":
            self.inner = _Evt3(self.source)
        elif version.startswith("2") or fmt == "EVT2":
            self.inner = _Evt2(self.source)
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
