"""Binning speed: tmkt's binner against the previous one (kept here as the baseline) and tonic.

Run: python bench/binning.py [--repeats 15] [--no-tonic]

1. A live window at the DAVIS346 peak: 600,000 uniformly random events on 346x260 (50 ms at
   12 Mev/s) binned by `frames_from_events` into the small model's input (T=8, 32x32), for both
   resize modes, time-sorted (as a live stream delivers them) and shuffled, in tmkt's EVENT_DTYPE
   and in the 16-byte record of a dv-processing packet; plus the window handed over as its 50
   1 ms packets (what `tmkt.runtime.live` bins, without concatenating them).
2. 1M events, 346x260, T=10 at sensor size, against tonic's ToFrame (which drops the last event).

Every timing is the least CPU time (process_time) of `--repeats` calls, old and new alternating in
the same run, so that a loaded machine slows both alike; run it pinned to one core
(`taskset -c 0`) with OMP_NUM_THREADS=1. Each result is checked to equal the baseline's, bit for
bit, before the ratio old/new is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# ---------------------------------------------------------------- the baseline: tmkt's binner before the one-pass
# rewrite (commit 5c1ac0f, tmkt/data/binning.py and spec.frames_from_events), kept verbatim in behaviour.


def _old_bin_starts(events, n_bins, by):
    n = len(events)
    if by == "count":
        return -((-np.arange(n_bins + 1, dtype=np.int64) * n) // n_bins)
    t = np.ascontiguousarray(events["t"])
    if t.dtype.kind == "f" or not bool((t[1:] >= t[:-1]).all()):
        return None
    t0, t1 = int(t[0]), int(t[-1])
    span = t1 - t0
    starts = np.full(n_bins + 1, n, dtype=np.int64)
    starts[0] = 0
    if span > 0:
        edges = t0 - ((-np.arange(1, n_bins, dtype=np.int64) * span) // n_bins)
        starts[1:n_bins] = np.searchsorted(t, edges, side="left")
    return starts


def _old_bin_index(events, n_bins):
    t = np.asarray(events["t"])
    if t.dtype.kind == "f":
        t = np.rint(t)
    t = t.astype(np.int64, copy=False)
    t0, t1 = int(t.min()), int(t.max())
    span = t1 - t0
    if span == 0:
        return np.zeros(len(t), dtype=np.int64)
    if span * n_bins < 2**62:
        b = ((t - t0) * n_bins) // span
    else:
        b = np.floor((t - t0).astype(np.float64) * (n_bins / span)).astype(np.int64)
    return np.minimum(b, n_bins - 1, out=b)


def old_to_frames(events, sensor_size, n_bins, *, by="time", binary=False, out_size=None, resize="frames"):
    from tmkt.data.binning import resize_frames

    width, height = int(sensor_size[0]), int(sensor_size[1])
    n_pix = height * width
    events = np.asarray(events)
    if len(events) == 0:
        if out_size is not None and resize == "events":
            height, width = (int(v) for v in out_size)
        frames = np.zeros((n_bins, 2, height, width), dtype=np.float32)
    else:
        x = np.ascontiguousarray(events["x"])
        y = np.ascontiguousarray(events["y"])
        if x.min() < 0 or x.max() >= width or y.min() < 0 or y.max() >= height:
            raise ValueError(f"event coordinates fall outside the sensor {width}x{height}")
        if out_size is not None and resize == "events":
            h_out, w_out = (int(v) for v in out_size)
            x = (np.asarray(x, np.int64) * w_out) // width
            y = (np.asarray(y, np.int64) * h_out) // height
            width, height = w_out, h_out
            n_pix = height * width
        flat = (np.asarray(events["p"]) > 0).astype(np.int64)
        flat *= height
        flat += y
        flat *= width
        flat += x
        starts = _old_bin_starts(events, n_bins, by)
        if starts is None:
            flat += _old_bin_index(events, n_bins) * (2 * n_pix)
            counts = np.bincount(flat, minlength=n_bins * 2 * n_pix)
            frames = counts.astype(np.float32).reshape(n_bins, 2, height, width)
        else:
            frames = np.empty((n_bins, 2, height, width), dtype=np.float32)
            for k in range(n_bins):
                counts = np.bincount(flat[starts[k] : starts[k + 1]], minlength=2 * n_pix)
                frames[k] = counts.reshape(2, height, width)
    if binary:
        frames = (frames > 0).astype(np.float32)
    if out_size is not None and resize == "frames":
        frames = resize_frames(frames, out_size)
    return frames


def old_frames_from_events(events, spec):
    from tmkt.data.spec import DEFAULT_BINNING

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
    return old_to_frames(events, (w, h, 2), spec.timesteps, by=binning["by"], binary=bool(binning["binary"]),
                         out_size=tuple(spec.input_size), resize=binning["resize"])


# ---------------------------------------------------------------- inputs

# dv-processing's event record (what `tmkt.runtime.live` views a DV packet as)
DV_RECORD = np.dtype({"names": ["t", "x", "y", "p"], "formats": ["<i8", "<i2", "<i2", "i1"],
                      "offsets": [0, 8, 10, 12], "itemsize": 16})


def make_events(n: int = 1_000_000, width: int = 346, height: int = 260, seed: int = 0, span_us: int = 1_000_000,
                dtype=None) -> np.ndarray:
    """``[n]`` random events sorted by time, t_first = 0, t_last = span_us (tonic's dtype by default)."""
    rng = np.random.default_rng(seed)
    dtype = dtype or np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", bool)])
    ev = np.zeros(n, dtype=dtype)
    ev["x"] = rng.integers(0, width, n)
    ev["y"] = rng.integers(0, height, n)
    t = np.sort(rng.integers(0, span_us + 1, n))
    t[0], t[-1] = 0, span_us
    ev["t"] = t
    ev["p"] = rng.integers(0, 2, n)
    return ev


def best_pair(old, new, repeats: int) -> tuple[float, float, object, object]:
    """Least CPU time of `old()` and `new()`, called alternately `repeats` times each (CPU time:
    on a shared machine wall time counts the other processes' turns; alternating exposes both to
    the same load)."""
    t_old = t_new = float("inf")
    out_old = out_new = None
    for _ in range(repeats):
        s = time.process_time()
        out_old = old()
        t_old = min(t_old, time.process_time() - s)
        s = time.process_time()
        out_new = new()
        t_new = min(t_new, time.process_time() - s)
    return t_old, t_new, out_old, out_new


def live_window(repeats: int) -> None:
    from tmkt.data.events import EVENT_DTYPE
    from tmkt.data.spec import DataSpec, frames_from_events

    n = 600_000
    print(f"live window: {n:,} events on 346x260 (50 ms at 12 Mev/s) -> T=8 x 2 x 32 x 32, "
          f"least CPU time of {repeats}")
    print(f"{'input':58s} {'old ms':>8s} {'new ms':>8s} {'old/new':>8s} {'new Mev/s':>10s}")
    for resize in ("events", "frames"):
        spec = DataSpec("bench", ("a",), (346, 260, 2), (32, 32), 8,
                        {"by": "time", "binary": False, "shift_to_origin": False, "resize": resize})
        for name, dtype in (("EVENT_DTYPE", EVENT_DTYPE), ("DV record", DV_RECORD)):
            ev = make_events(n, span_us=50_000, dtype=dtype, seed=1)
            shuffled = ev[np.random.default_rng(2).permutation(n)]
            packets = np.split(ev, 50)
            cases = [("sorted", ev, ev), ("shuffled", shuffled, shuffled)]
            if name == "DV record":
                cases.append(("50 packets (old: concatenated)", packets, packets))
            for label, a, b in cases:
                old_in = (lambda a=a: np.concatenate(a)) if isinstance(a, list) else (lambda a=a: a)
                t_old, t_new, ref, got = best_pair(lambda: old_frames_from_events(old_in(), spec),
                                                   lambda: frames_from_events(b, spec), repeats)
                if not np.array_equal(ref, got):
                    raise SystemExit(f"MISMATCH: resize={resize} {name} {label}")
                print(f"{f'resize={resize}, {name}, {label}':58s} {t_old * 1e3:8.2f} {t_new * 1e3:8.2f} "
                      f"{t_old / t_new:8.2f} {n / t_new / 1e6:10.1f}")
    print("every result equals the baseline's, bit for bit")


def against_tonic(repeats: int) -> None:
    import tonic.transforms as tt

    from tmkt.data.binning import to_frames

    sensor = (346, 260, 2)
    n_bins = 10
    events = make_events()
    tonic_tf = tt.ToFrame(sensor_size=sensor, n_time_bins=n_bins)
    t_tonic, t_ours, ref, ours = best_pair(lambda: tonic_tf(events), lambda: to_frames(events, sensor, n_bins), repeats)
    t_old, _, old, _ = best_pair(lambda: old_to_frames(events, sensor, n_bins), lambda: None, repeats)
    # Same counts, except the last event (bin T-1, its pixel and polarity), which tonic drops.
    last = events[-1]
    expected = ref.astype(np.float32)
    expected[n_bins - 1, int(last["p"]), int(last["y"]), int(last["x"])] += 1
    if ours.shape != expected.shape or not np.array_equal(ours, expected) or not np.array_equal(ours, old):
        raise SystemExit("MISMATCH: to_frames, the baseline and tonic ToFrame disagree beyond the last event")
    print(f"\nevents: {len(events):,}  sensor: {sensor[0]}x{sensor[1]}  T={n_bins}  least CPU time of {repeats}")
    print(f"tonic ToFrame        : {t_tonic * 1e3:8.1f} ms")
    print(f"tmkt to_frames (old) : {t_old * 1e3:8.1f} ms")
    print(f"tmkt to_frames       : {t_ours * 1e3:8.1f} ms")
    print(f"speed-up vs tonic    : {t_tonic / t_ours:8.1f}x  (counts agree; tonic drops the last event)")
    print(f"speed-up vs old      : {t_old / t_ours:8.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-tonic", action="store_true", help="skip the comparison with tonic's ToFrame")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    live_window(args.repeats)
    if not args.no_tonic:
        against_tonic(args.repeats)


if __name__ == "__main__":
    main()
