"""to_frames against a naive per-event loop, tonic's ToFrame and a numpy bilinear resize."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmkt.data.binning import to_frames

TONIC_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", bool)])


def naive_frames(events, width, height, n_bins, by):
    """Per-event loop straight from the definitions, with exact fractions."""
    frames = np.zeros((n_bins, 2, height, width), dtype=np.float64)
    n = len(events)
    ts = [int(t) for t in events["t"]]
    if n:
        t0, t1 = min(ts), max(ts)
    for i, e in enumerate(events):
        if by == "count":
            b = 0
            while Fraction((b + 1) * n, n_bins) <= i:  # bin b holds i in [b*N/T, (b+1)*N/T)
                b += 1
        elif t1 == t0:
            b = 0
        else:
            width_t = Fraction(t1 - t0, n_bins)
            b = n_bins - 1  # the last bin is closed: it keeps t_last
            for k in range(n_bins):
                if t0 + k * width_t <= ts[i] < t0 + (k + 1) * width_t:
                    b = k
                    break
        frames[b, 1 if e["p"] > 0 else 0, int(e["y"]), int(e["x"])] += 1
    return frames


@st.composite
def streams(draw, max_events=40):
    width = draw(st.integers(1, 7))
    height = draw(st.integers(1, 6))
    n = draw(st.integers(0, max_events))
    ints = lambda lo, hi: draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))  # noqa: E731
    t = np.array(ints(0, draw(st.sampled_from([0, 3, 50, 10**7]))), dtype=np.int64)
    if draw(st.booleans()):
        t = np.sort(t)
    ev = np.empty(n, dtype=TONIC_DTYPE)
    ev["x"], ev["y"], ev["t"] = ints(0, width - 1), ints(0, height - 1), t
    ev["p"] = ints(0, 1)
    return ev, width, height


@settings(max_examples=150, deadline=None)
@given(streams(), st.integers(1, 6), st.sampled_from(["time", "count"]))
def test_matches_naive_loop(stream, n_bins, by):
    ev, width, height = stream
    got = to_frames(ev, (width, height, 2), n_bins, by=by)
    assert got.dtype == np.float32 and got.shape == (n_bins, 2, height, width)
    np.testing.assert_array_equal(got, naive_frames(ev, width, height, n_bins, by))
    assert got.sum() == len(ev)  # every event counted exactly once, the last one included


def test_last_event_is_counted_and_tonic_agrees_otherwise():
    import tonic.transforms as tt

    rng = np.random.default_rng(3)
    n = 5000
    ev = np.empty(n, dtype=TONIC_DTYPE)
    ev["x"], ev["y"], ev["p"] = rng.integers(0, 20, n), rng.integers(0, 15, n), rng.integers(0, 2, n)
    ev["t"] = np.sort(rng.integers(0, 100_001, n))
    ev["t"][0], ev["t"][-1] = 0, 100_000  # span divisible by T: tonic's bins are then ours
    ours = to_frames(ev, (20, 15, 2), 10)
    ref = tt.ToFrame(sensor_size=(20, 15, 2), n_time_bins=10)(ev).astype(np.float32)
    ref[9, int(ev["p"][-1]), ev["y"][-1], ev["x"][-1]] += 1  # the event tonic drops
    np.testing.assert_array_equal(ours, ref)
    assert ours.sum() == n


@pytest.mark.parametrize("by", ["time", "count"])
def test_empty_stream_same_shape_and_order(by):
    ev = np.empty(0, dtype=TONIC_DTYPE)
    out = to_frames(ev, (5, 3, 2), 4, by=by)
    assert out.shape == (4, 2, 3, 5) and out.dtype == np.float32 and not out.any()
    assert to_frames(ev, (5, 3), 4, out_size=(6, 2)).shape == (4, 2, 6, 2)


def test_count_mode_bin_sizes_differ_by_at_most_one():
    ev = np.zeros(23, dtype=TONIC_DTYPE)
    ev["t"] = np.arange(23) ** 2
    sizes = to_frames(ev, (1, 1), 5, by="count").sum(axis=(1, 2, 3))
    # bin floor(i * 5 / 23): bin k starts at ceil(4.6 k) = 0, 5, 10, 14, 19 (end 23)
    np.testing.assert_array_equal(sizes, [5, 5, 4, 5, 4])


def test_binary_and_polarity_channels():
    ev = np.zeros(5, dtype=[("t", "<u4"), ("x", "<i4"), ("y", "<u1"), ("p", "<i1"), ("extra", "f4")])
    ev["x"] = [0, 0, 2, 1, 0]
    ev["y"] = [1, 1, 0, 0, 1]
    ev["t"] = [0, 1, 2, 3, 4]
    ev["p"] = [1, 1, -1, 1, -1]  # -1/1 polarity: -1 is OFF
    counts = to_frames(ev, (3, 2), 1)
    assert counts[0, 1, 1, 0] == 2 and counts[0, 0, 1, 0] == 1 and counts[0, 0, 0, 2] == 1 and counts[0, 1, 0, 1] == 1
    binary = to_frames(ev, (3, 2), 1, binary=True)
    np.testing.assert_array_equal(binary, (counts > 0).astype(np.float32))


def bilinear_reference(img, h_out, w_out):
    """Half-pixel bilinear resize (align_corners=False), one output pixel at a time."""
    h_in, w_in = img.shape
    out = np.zeros((h_out, w_out))
    for i in range(h_out):
        sy = max((i + 0.5) * h_in / h_out - 0.5, 0.0)
        y0 = int(np.floor(sy))
        y1, ly = min(y0 + 1, h_in - 1), sy - y0
        for j in range(w_out):
            sx = max((j + 0.5) * w_in / w_out - 0.5, 0.0)
            x0 = int(np.floor(sx))
            x1, lx = min(x0 + 1, w_in - 1), sx - x0
            top = (1 - lx) * img[y0, x0] + lx * img[y0, x1]
            bottom = (1 - lx) * img[y1, x0] + lx * img[y1, x1]
            out[i, j] = (1 - ly) * top + ly * bottom
    return out


@pytest.mark.parametrize("out_size", [(5, 4), (16, 13)])
def test_resize_is_bilinear(out_size):
    rng = np.random.default_rng(4)
    n = 400
    ev = np.empty(n, dtype=TONIC_DTYPE)
    ev["x"], ev["y"], ev["p"] = rng.integers(0, 11, n), rng.integers(0, 9, n), rng.integers(0, 2, n)
    ev["t"] = np.sort(rng.integers(0, 1000, n))
    full = to_frames(ev, (11, 9), 3)
    small = to_frames(ev, (11, 9), 3, out_size=out_size)
    assert small.shape == (3, 2, *out_size) and small.dtype == np.float32
    for t in range(3):
        for c in range(2):
            np.testing.assert_allclose(small[t, c], bilinear_reference(full[t, c], *out_size), rtol=1e-5, atol=1e-5)


def test_rejects_out_of_sensor_and_bad_mode():
    ev = np.zeros(2, dtype=TONIC_DTYPE)
    ev["x"] = [0, 4]
    with pytest.raises(ValueError, match="outside"):
        to_frames(ev, (4, 4), 2)
    with pytest.raises(ValueError, match="by"):
        to_frames(ev, (5, 4), 2, by="space")


@pytest.mark.parametrize("sensor,out_size", [((36, 36), (32, 32)), ((11, 9), (5, 4)), ((34, 34), (17, 34))])
def test_resize_events_counts_every_event_once_at_the_output_grid(sensor, out_size):
    """resize="events": coordinates scaled by tonic's Downsample rule (floor(x * factor), one factor
    per axis, here in exact fractions), then counted; binary frames stay 0/1 (the chip's spikes)."""
    tonic = pytest.importorskip("tonic")
    rng = np.random.default_rng(7)
    n = 3000
    ev = np.empty(n, dtype=TONIC_DTYPE)
    ev["x"], ev["y"] = rng.integers(0, sensor[0], n), rng.integers(0, sensor[1], n)
    ev["p"], ev["t"] = rng.integers(0, 2, n), np.sort(rng.integers(0, 10_000, n))
    counts = to_frames(ev, sensor, 4, out_size=out_size, resize="events")
    h, w = out_size
    assert counts.shape == (4, 2, h, w) and counts.sum() == n and np.array_equal(counts, np.round(counts))
    # numpy reference with exact rational factors
    xs = np.array([int(Fraction(int(x)) * Fraction(w, sensor[0])) for x in ev["x"]])
    ys = np.array([int(Fraction(int(y)) * Fraction(h, sensor[1])) for y in ev["y"]])
    bins = np.minimum((ev["t"] - ev["t"][0]) * 4 // (ev["t"][-1] - ev["t"][0]), 3)
    ref = np.zeros((4, 2, h, w), np.float32)
    np.add.at(ref, (bins, ev["p"].astype(int), ys, xs), 1)
    np.testing.assert_array_equal(counts, ref)
    if w / sensor[0] == h / sensor[1]:  # tonic's Downsample takes one factor for both axes
        down = tonic.transforms.Downsample(spatial_factor=w / sensor[0])(ev.copy())
        assert np.mean(down["x"] == xs) > 0.95  # tonic's float factor puts a few events one pixel off
    binary = to_frames(ev, sensor, 4, binary=True, out_size=out_size, resize="events")
    np.testing.assert_array_equal(binary, (ref > 0).astype(np.float32))


def numpy_reference(ev, sensor, n_bins, by, out_size=None):
    """Counts [T, 2, H, W] with np.add.at and exact integer bins (independent of the binner)."""
    width, height = sensor
    t = ev["t"].astype(np.int64)
    n = len(ev)
    if by == "count":
        bins = np.arange(n) * n_bins // n
    else:
        span = int(t.max() - t.min())
        bins = np.zeros(n, np.int64) if span == 0 else np.minimum((t - t.min()) * n_bins // span, n_bins - 1)
    x, y = ev["x"].astype(np.int64), ev["y"].astype(np.int64)
    if out_size is not None:
        (height, width) = out_size
        x, y = x * width // sensor[0], y * height // sensor[1]
    ref = np.zeros((n_bins, 2, height, width), np.float32)
    np.add.at(ref, (bins, (ev["p"] > 0).astype(int), y, x), 1)
    return ref


@pytest.mark.parametrize("by", ["time", "count"])
@pytest.mark.parametrize("order", ["sorted", "shuffled", "packets"])
@pytest.mark.parametrize("resize", ["events", "frames"])
def test_one_pass_binner_equals_a_numpy_reference(by, order, resize):
    """Streams longer than one segment of the binner (16k events), in tmkt's and dv-processing's
    record layouts: equal to np.add.at counts, whole, shuffled, or given as packets."""
    from tmkt.data.binning import bin_events
    from tmkt.data.events import EVENT_DTYPE

    dv_record = np.dtype({"names": ["t", "x", "y", "p"], "formats": ["<i8", "<i2", "<i2", "i1"],
                          "offsets": [0, 8, 10, 12], "itemsize": 16})
    rng = np.random.default_rng(11)
    n, sensor, out = 50_003, (346, 260), (32, 32)
    for dtype in (EVENT_DTYPE, dv_record):
        ev = np.zeros(n, dtype)
        ev["x"], ev["y"], ev["p"] = rng.integers(0, 346, n), rng.integers(0, 260, n), rng.integers(0, 2, n)
        ev["t"] = np.sort(rng.integers(1_700_000_000_000_000, 1_700_000_000_050_000, n))
        if order == "shuffled":
            ev = ev[rng.permutation(n)]
        given = np.split(ev, np.sort(rng.integers(0, n, 40))) if order == "packets" else ev
        ref = numpy_reference(ev, sensor, 8, by, out if resize == "events" else None)
        got = bin_events(given, sensor, 8, by=by, out_size=out, resize=resize)
        if resize == "frames":
            from tmkt.data.binning import resize_frames

            ref = resize_frames(ref, out)  # the same resize of the same counts
        np.testing.assert_array_equal(got, ref)
