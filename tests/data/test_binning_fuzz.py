"""Fuzz tests of the binning and the windows: a correct result or the named error, never a silent
wrong count, an overflow or a huge allocation.

Events are drawn anywhere in the 64-bit timestamp range (int64 limits, uint64 above 2**63, float
timestamps up to 1e30 and NaN), in several record layouts, sorted or not, whole or in packets,
with coordinates inside and outside the sensor; the references below compute every bin and window
with Python integers, one event at a time. Hypothesis runs derandomized (fixed seed).
"""

from __future__ import annotations

import time
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmkt.data import binning
from tmkt.data.binning import (
    FrameSizeError,
    TimestampRangeError,
    WindowCountError,
    bin_events,
    resize_frames,
    to_frames,
)
from tmkt.data.events import EVENT_DTYPE
from tmkt.data.spec import DataSpec, frames_from_events
from tmkt.runtime.classifier import split_windows

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# record layouts seen in practice: tmkt's, tonic's, dv-processing's 16-byte packet record, and a
# few that stress the time arithmetic (uint64, float, narrow integer timestamps)
DV_RECORD = np.dtype({"names": ["t", "x", "y", "p"], "formats": ["<i8", "<i2", "<i2", "i1"],
                      "offsets": [0, 8, 10, 12], "itemsize": 16})
LAYOUTS = {
    "tmkt": EVENT_DTYPE,
    "tonic": np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")]),
    "dv": DV_RECORD,
    "uint64": np.dtype([("t", "<u8"), ("x", "<u4"), ("y", "<i8"), ("p", "<i1")]),
    "float": np.dtype([("x", "<i4"), ("y", "<u1"), ("t", "<f8"), ("p", "<f4")]),
    "int16": np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i2"), ("p", "u1")]),
}
T_RANGE = {"tmkt": (-(2**63), 2**63 - 1), "tonic": (-(2**63), 2**63 - 1), "dv": (-(2**63), 2**63 - 1),
           "uint64": (0, 2**64 - 1), "int16": (-(2**15), 2**15 - 1)}


@st.composite
def timestamps(draw, layout: str, n: int) -> list:
    """n timestamps for `layout`: a cluster (small span) somewhere in the range, or spread over
    all of it; floats add 1e30, inf and NaN now and then."""
    if layout == "float":
        pool = st.one_of(st.integers(-(10**6), 10**6).map(float), st.floats(-1e18, 1e18, allow_nan=False),
                         st.sampled_from([1e30, -1e30, float("nan"), float("inf"), 2.0**63, 0.5, 2.5, -0.5]))
        return draw(st.lists(pool, min_size=n, max_size=n))
    lo, hi = T_RANGE[layout]
    kind = draw(st.sampled_from(["cluster", "spread", "extremes"]))
    if kind == "cluster":
        base = draw(st.sampled_from([lo, hi, 0, lo // 2 + hi // 2, 2**61]) | st.integers(lo, hi))
        spread = draw(st.sampled_from([0, 3, 50, 10**6]))
        first = min(max(base, lo), hi - spread)
        return draw(st.lists(st.integers(max(lo, first), first + spread), min_size=n, max_size=n))
    if kind == "spread":
        return draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    # the values where 64-bit arithmetic breaks: the limits, and multiples of 2**61
    marks = [v for v in (lo, lo + 1, hi - 1, hi, 0, 2**61, 2**62, 3 * 2**61, -(2**62), 2**63 + 1) if lo <= v <= hi]
    return draw(st.lists(st.sampled_from(marks) | st.integers(lo, hi), min_size=n, max_size=n))


@st.composite
def streams(draw, max_events: int = 30, outside: bool = False):
    """(events, width, height): a random stream; with `outside`, coordinates may leave the sensor."""
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    dtype = LAYOUTS[layout]
    width, height = draw(st.integers(1, 7)), draw(st.integers(1, 6))
    n = draw(st.integers(0, max_events))
    t = timestamps(layout, n)
    ts = draw(t)
    if layout != "float" and draw(st.booleans()):
        ts = sorted(ts)
    signed_x = dtype["x"].kind == "i"
    signed_y = dtype["y"].kind == "i"
    x_lo, y_lo = (-3 if signed_x else 0, -3 if signed_y else 0) if outside else (0, 0)
    x_hi, y_hi = (width + 3, height + 3) if outside else (width - 1, height - 1)
    ev = np.zeros(n, dtype=dtype)
    ev["x"] = draw(st.lists(st.integers(x_lo, x_hi), min_size=n, max_size=n))
    ev["y"] = draw(st.lists(st.integers(y_lo, y_hi), min_size=n, max_size=n))
    ev["t"] = np.array(ts, dtype=dtype["t"])
    ev["p"] = draw(st.lists(st.sampled_from([0, 1] if dtype["p"].kind in "ub" else [-1, 0, 1]), min_size=n, max_size=n))
    return ev, width, height


def python_times(ev) -> list[int] | None:
    """Timestamps as Python ints as the binning reads them (floats rounded half to even), or None
    where the binning must refuse them (NaN, infinite, beyond int64)."""
    out = []
    for v in ev["t"].tolist():
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return None
            v = round(v)  # Python rounds half to even, as np.rint
            if not -(2**63) <= v < 2**63:
                return None
        out.append(int(v))
    return out


def reference(ev, width, height, n_bins, by, out_size=None, drop=False, shift=False):
    """Counts [T, 2, H, W] (float64), one event at a time in Python integers; None: the binning
    must refuse the timestamps (of the events it keeps: dropped ones take no part)."""
    xs, ys, ps = ev["x"].tolist(), ev["y"].tolist(), [v > 0 for v in ev["p"].tolist()]
    if shift and len(ev):
        mx, my = min(xs), min(ys)
        xs, ys = [x - mx for x in xs], [y - my for y in ys]
    keep = [i for i in range(len(ev)) if 0 <= xs[i] < width and 0 <= ys[i] < height]
    if len(keep) < len(ev) and not drop:
        return "outside"
    ts = python_times(ev[keep]) if by == "time" else None
    if ts is None and by == "time" and keep:
        return None
    h_out, w_out = (height, width) if out_size is None else out_size
    frames = np.zeros((n_bins, 2, h_out, w_out))
    if ts:
        t0, t1 = min(ts), max(ts)
    for j, i in enumerate(keep):
        if by == "count":
            b = j * n_bins // len(keep)
        else:
            b = 0 if t1 == t0 else min((ts[j] - t0) * n_bins // (t1 - t0), n_bins - 1)
        x, y = xs[i] * w_out // width, ys[i] * h_out // height
        frames[b, int(ps[i]), y, x] += 1
    return frames


def pieces_of(ev, cuts):
    bounds = sorted({min(c, len(ev)) for c in cuts} | {0, len(ev)})
    return [ev[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@FUZZ
@given(streams(), st.integers(1, 6), st.sampled_from(["time", "count"]), st.sampled_from(["frames", "events"]),
       st.booleans(), st.sampled_from([None, (3, 2), (1, 5)]), st.sampled_from([3, 1 << 14]), st.booleans())
def test_to_frames_is_the_reference_or_refuses(stream, n_bins, by, resize, binary, out_size, segment, per_bin):
    ev, width, height = stream
    ref = reference(ev, width, height, n_bins, by, out_size if resize == "events" else None)
    # small segments and a zero cache size send small streams through every path of the loop
    with patch.object(binning, "_SEGMENT", segment), patch.object(binning, "_CACHE_BYTES", 0 if per_bin else 1 << 20):
        if ref is None:
            with pytest.raises(TimestampRangeError):
                to_frames(ev, (width, height), n_bins, by=by, out_size=out_size, resize=resize)
            return
        got = to_frames(ev, (width, height), n_bins, by=by, binary=binary, out_size=out_size, resize=resize)
    if binary:
        ref = (ref > 0).astype(np.float64)
    ref = ref.astype(np.float32)
    if out_size is not None and resize == "frames":
        ref = resize_frames(ref, out_size)  # the same resize of the same counts: equal bit for bit
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    if not binary and (out_size is None or resize == "events"):
        assert got.sum() == len(ev)  # every event counted exactly once


@FUZZ
@given(streams(outside=True), st.integers(1, 5), st.sampled_from(["time", "count"]), st.sampled_from(["frames", "events"]),
       st.booleans(), st.lists(st.integers(0, 30), max_size=4), st.sampled_from([2, 1 << 14]))
def test_frames_from_events_is_the_reference_or_refuses(stream, n_bins, by, resize, shift, cuts, segment):
    """frames_from_events drops events outside the sensor (after the shift) before binning; a
    window given as packets bins as their concatenation."""
    ev, width, height = stream
    spec = DataSpec("fuzz", ("a",), (width, height, 2), (2, 3), n_bins,
                    {"by": by, "binary": False, "shift_to_origin": shift, "resize": resize})
    ref = reference(ev, width, height, n_bins, by, (2, 3) if resize == "events" else None, drop=True, shift=shift)
    with patch.object(binning, "_SEGMENT", segment):
        for given_as in (ev, pieces_of(ev, cuts)):
            if ref is None:
                with pytest.raises(TimestampRangeError):
                    frames_from_events(given_as, spec)
                continue
            got = frames_from_events(given_as, spec)
            want = ref.astype(np.float32) if resize == "events" else resize_frames(ref.astype(np.float32), (2, 3))
            np.testing.assert_array_equal(got, want)


@FUZZ
@given(st.sampled_from(["tmkt", "uint64", "int16"]), st.data(), st.integers(1, 2**64), st.sampled_from([None, 40]))
def test_split_windows_is_the_reference_or_refuses(layout, data, window_us, max_windows):
    n = data.draw(st.integers(1, 25))
    ts = sorted(data.draw(timestamps(layout, n)))
    ev = np.zeros(n, dtype=LAYOUTS[layout])
    ev["t"] = np.array(ts, dtype=LAYOUTS[layout]["t"])
    ev["x"] = np.arange(n)
    count = (ts[-1] - ts[0]) // window_us + 1
    if max_windows is not None and count > max_windows:
        with pytest.raises(WindowCountError):
            split_windows(ev, window_us, max_windows=max_windows)
        return
    if count > 10_000:  # the reference below would loop too long: let the limit refuse it
        with pytest.raises(WindowCountError):
            split_windows(ev, window_us, max_windows=10_000)
        return
    windows = split_windows(ev, window_us, max_windows=max_windows)
    assert len(windows) == count
    for k, w in enumerate(windows):
        want = [i for i, t in enumerate(ts) if (t - ts[0]) // window_us == k]
        assert w["x"].tolist() == want


# ---------------------------------------------------------------- the cases of issue 15, one test each


def _events(t, dtype=EVENT_DTYPE):
    ev = np.zeros(len(t), dtype=dtype)
    ev["t"] = np.array(t, dtype=dtype["t"])
    ev["x"] = np.arange(len(t)) % 4
    return ev


@pytest.mark.parametrize("by", ["time", "count"])
def test_timestamps_at_the_int64_limits_bin_correctly(by):
    lo, hi = -(2**63), 2**63 - 1
    ev = _events([lo, lo + 1, hi - 1, hi])
    got = to_frames(ev, (4, 1), 4, by=by)  # was OverflowError in _bin_starts
    bins = got.sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(bins, [2, 0, 0, 2] if by == "time" else [1, 1, 1, 1])


@pytest.mark.parametrize("sort", [True, False])
def test_spans_beyond_2_61_us_count_every_event_once(sort):
    # four events, one per time bin, over a span of 3 * 2**61 us (to_frames counted 8 or 11 of 4)
    t = [0, 2**61, 2**62, 3 * 2**61]
    ev = _events(t if sort else t[::-1])
    got = to_frames(ev, (4, 1), 4)
    assert got.sum() == 4
    np.testing.assert_array_equal(got.sum(axis=(1, 2, 3)), [1, 1, 1, 1])


def test_uint64_timestamps_above_2_63_do_not_wrap():
    ev = _events([2**63 + 5, 2**63 + 6, 2**64 - 2, 2**64 - 1], LAYOUTS["uint64"])
    np.testing.assert_array_equal(to_frames(ev, (4, 1), 2).sum(axis=(1, 2, 3)), [2, 2])
    windows = split_windows(ev, 2**61)  # span 2**63 - 6: four windows, the middle two empty
    assert [len(w) for w in windows] == [2, 0, 0, 2]
    assert [int(w["t"][0]) for w in windows if len(w)] == [2**63 + 5, 2**64 - 2]


@pytest.mark.parametrize("bad", [1e30, -1e30, float("nan"), float("inf"), 2.0**63])
def test_float_timestamps_beyond_int64_are_a_named_error(bad):
    ev = _events([0.0, bad], LAYOUTS["float"])
    with pytest.raises(TimestampRangeError, match="timestamps"):
        to_frames(ev, (4, 1), 3)
    spec = DataSpec("x", ("a",), (4, 1, 2), (1, 4), 3, {})
    with pytest.raises(TimestampRangeError):
        frames_from_events(ev, spec)


def test_window_count_is_limited_before_allocating():
    # a valid 2-event recording spanning 2**32 - 1 us cut into 1 us windows: 4.3e9 windows, which
    # tried to allocate 32 GiB; now refused at once
    ev = _events([0, 2**32 - 1])
    start = time.perf_counter()
    with pytest.raises(WindowCountError, match="4,294,967,296 windows of 1 µs.*limit of 100,000"):
        split_windows(ev, 1)
    assert time.perf_counter() - start < 5  # no allocation per window (a bound, not a speed claim)
    assert len(split_windows(ev, 2**20, max_windows=4096)) == 4096  # raised by the caller: allowed


def test_frames_that_would_not_fit_are_a_named_error_before_allocating():
    ev = _events([0, 1, 2])
    with pytest.raises(FrameSizeError, match=r"frames of 1000000000x2x260x346 need .* GiB, over the 4 GiB limit"):
        to_frames(np.zeros(0, EVENT_DTYPE), (346, 260), 10**9)
    with pytest.raises(FrameSizeError):
        bin_events(ev, (4, 1), 10, max_bytes=100)
    assert bin_events(ev, (4, 1), 10, max_bytes=10 * 2 * 4 * 12).sum() == 3  # exactly at the limit: fine
    spec = DataSpec("x", ("a",), (346, 260, 2), (32, 32), 8, {"resize": "frames"})
    with pytest.raises(FrameSizeError, match="8x2x260x346"):  # resize "frames" bins at sensor size first
        frames_from_events(ev, spec, max_bytes=8 * 2 * 260 * 346 * 12 - 1)
