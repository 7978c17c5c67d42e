"""Time tmkt's to_frames against tonic's ToFrame on 1M random events (346x260, T=10).

Run: python bench/binning.py

Timestamps span exactly [0, 1_000_000] us so that tonic's integer bin width (span // T)
covers the whole span; tonic then drops only the last event, which the check allows for.
"""

from __future__ import annotations

import time

import numpy as np


def make_events(n: int = 1_000_000, width: int = 346, height: int = 260, seed: int = 0) -> np.ndarray:
    """``[n]`` random events in tonic's dtype, sorted by time, t_first = 0, t_last = 1e6 us."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", bool)])
    ev = np.empty(n, dtype=dtype)
    ev["x"] = rng.integers(0, width, n)
    ev["y"] = rng.integers(0, height, n)
    t = np.sort(rng.integers(0, 1_000_001, n))
    t[0], t[-1] = 0, 1_000_000
    ev["t"] = t
    ev["p"] = rng.integers(0, 2, n).astype(bool)
    return ev


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(repeats: int = 7) -> None:
    import tonic.transforms as tt

    from tmkt.data.binning import to_frames

    sensor = (346, 260, 2)
    n_bins = 10
    events = make_events()
    tonic_tf = tt.ToFrame(sensor_size=sensor, n_time_bins=n_bins)

    t_tonic, ref = best_of(lambda: tonic_tf(events), repeats)
    t_ours, ours = best_of(lambda: to_frames(events, sensor, n_bins), repeats)

    # Same counts, except the last event (bin T-1, its pixel and polarity), which tonic drops.
    last = events[-1]
    expected = ref.astype(np.float32)
    expected[n_bins - 1, int(last["p"]), int(last["y"]), int(last["x"])] += 1
    if ours.shape != expected.shape or not np.array_equal(ours, expected):
        raise SystemExit("MISMATCH: to_frames and tonic ToFrame disagree beyond the last event")
    print(f"events: {len(events):,}  sensor: {sensor[0]}x{sensor[1]}  T={n_bins}  best of {repeats}")
    print(f"tonic ToFrame : {t_tonic * 1e3:8.1f} ms")
    print(f"tmkt to_frames: {t_ours * 1e3:8.1f} ms")
    print(f"speed-up      : {t_tonic / t_ours:8.1f}x  (counts agree; tonic drops the last event)")


if __name__ == "__main__":
    main()
