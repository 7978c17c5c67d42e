"""Bin an event stream into frames ``[T, 2, H, W]``.

Channel 0 counts OFF events (p = 0), channel 1 counts ON events (p = 1); any p > 0 counts
as ON, so bool and {-1, 1} polarities work too.

Two ways to cut the stream into ``T`` bins, each event counted exactly once:

- ``by="time"``: ``T`` equal time bins over ``[t_first, t_last]``; event ``i`` goes to bin
  ``min(floor((t_i - t_first) * T / (t_last - t_first)), T - 1)``, so bins are half-open
  except the last, which also holds the last event (tonic's ``ToFrame(n_time_bins=T)`` drops
  it, and also drops the events after ``t_first + T * floor(span / T)``). All events fall in
  bin 0 when ``t_last == t_first``.
- ``by="count"``: ``T`` bins of (nearly) equal event count, in array order; event ``i`` of
  ``N`` goes to bin ``floor(i * T / N)``, so bin sizes differ by at most one.

Counting uses ``np.bincount`` over a flat pixel index, one call per bin when bins are
contiguous runs of the array (count mode, or time-sorted events: cache-sized outputs), else
one call over all bins; no per-event Python loop and no ``np.add.at``.
"""

from __future__ import annotations

import numpy as np


def _bin_starts(events: np.ndarray, n_bins: int, by: str) -> np.ndarray | None:
    """Start index of each bin, ``[T + 1]``, when bins are contiguous runs of the array
    (count mode, or time mode on time-sorted events); None otherwise."""
    n = len(events)
    if by == "count":
        # event i is in bin floor(i * T / N), so bin k starts at ceil(k * N / T)
        return -((-np.arange(n_bins + 1, dtype=np.int64) * n) // n_bins)
    if by != "time":
        raise ValueError(f"by must be 'time' or 'count', got {by!r}")
    t = np.ascontiguousarray(events["t"])
    if t.dtype.kind == "f" or not bool((t[1:] >= t[:-1]).all()):
        return None
    t0, t1 = int(t[0]), int(t[-1])
    span = t1 - t0
    starts = np.full(n_bins + 1, n, dtype=np.int64)
    starts[0] = 0
    if span > 0:
        # bin k (k >= 1) starts at the first t with (t - t0) * T >= k * span
        edges = t0 - ((-np.arange(1, n_bins, dtype=np.int64) * span) // n_bins)
        starts[1:n_bins] = np.searchsorted(t, edges, side="left")
    return starts


def _bin_index(events: np.ndarray, n_bins: int) -> np.ndarray:
    """Time bin of every event, for unsorted or float timestamps: ``[N]`` int64."""
    t = np.asarray(events["t"])
    if t.dtype.kind == "f":
        t = np.rint(t)
    t = t.astype(np.int64, copy=False)
    t0, t1 = int(t.min()), int(t.max())
    span = t1 - t0
    if span == 0:
        return np.zeros(len(t), dtype=np.int64)
    if span * n_bins < 2**62:
        b = ((t - t0) * n_bins) // span  # exact; the last event lands on T, folded below
    else:  # absurdly long spans: float is fine, bins are wide
        b = np.floor((t - t0).astype(np.float64) * (n_bins / span)).astype(np.int64)
    return np.minimum(b, n_bins - 1, out=b)


def to_frames(
    events: np.ndarray,
    sensor_size,
    n_bins: int,
    *,
    by: str = "time",
    binary: bool = False,
    out_size: tuple[int, int] | None = None,
    resize: str = "frames",
) -> np.ndarray:
    """Accumulate events into ``n_bins`` frames.

    Args:
        events: ``[N]`` structured array with fields x, y, t (us), p; other fields and any
            integer widths are accepted. May be empty.
        sensor_size: ``(W, H)`` or ``(W, H, 2)`` as tonic orders it.
        n_bins: number of frames ``T`` (>= 1).
        by: ``"time"`` (equal durations) or ``"count"`` (equal event counts); see the module
            docstring for the exact rule.
        binary: frames hold 1 where a pixel had at least one event in the bin, else 0.
            Applied before any resize.
        out_size: ``(H_out, W_out)`` to resize each frame to, bilinearly
            (``torch.nn.functional.interpolate``, ``align_corners=False``, no antialias, as
            the EKT/TMKT code does). The resize does NOT preserve event counts: each output
            pixel interpolates the 4 nearest input pixels, so the sum scales by roughly
            ``(H_out * W_out) / (H * W)`` and, when shrinking more than 2x, events between
            sample points are skipped.
        resize: how ``out_size`` is reached. ``"frames"``: bin at sensor size, then resize the
            frames bilinearly (above). ``"events"``: scale the event coordinates first,
            ``x' = floor(x * W_out / W)`` and ``y' = floor(y * H_out / H)`` in exact integer
            arithmetic (tonic's ``Downsample`` with a per-axis factor), then bin at
            ``out_size``: every event is counted once, counts stay integers and binary frames
            stay exactly binary (what a spiking chip is fed).

    Returns:
        float32 ``[T, 2, H, W]`` (or ``[T, 2, H_out, W_out]``); channel 0 = OFF, 1 = ON.
        An empty stream gives zeros of the same shape.
    """
    size = tuple(int(v) for v in sensor_size)
    if len(size) not in (2, 3) or (len(size) == 3 and size[2] != 2):
        raise ValueError(f"sensor_size must be (W, H) or (W, H, 2), got {sensor_size!r}")
    width, height = size[0], size[1]
    if resize not in ("frames", "events"):
        raise ValueError(f"resize must be 'frames' or 'events', got {resize!r}")
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n_pix = height * width
    events = np.asarray(events)
    n = len(events)
    if n == 0:
        if by not in ("time", "count"):
            raise ValueError(f"by must be 'time' or 'count', got {by!r}")
        if out_size is not None and resize == "events":
            height, width = (int(v) for v in out_size)
        frames = np.zeros((n_bins, 2, height, width), dtype=np.float32)
    else:
        # contiguous copies first: reductions and arithmetic on strided struct fields are slow
        x = np.ascontiguousarray(events["x"])
        y = np.ascontiguousarray(events["y"])
        if x.min() < 0 or x.max() >= width or y.min() < 0 or y.max() >= height:
            raise ValueError(f"event coordinates fall outside the sensor {width}x{height}")
        if out_size is not None and resize == "events":
            x, y, (width, height) = downsample_coordinates(x, y, (width, height), out_size)
            n_pix = height * width
        # flat index ((bin * 2 + p) * H + y) * W + x, built in place; the bin is added below
        flat = (np.asarray(events["p"]) > 0).astype(np.int64)
        flat *= height
        flat += y
        flat *= width
        flat += x
        starts = _bin_starts(events, n_bins, by)
        if starts is None:
            flat += _bin_index(events, n_bins) * (2 * n_pix)
            counts = np.bincount(flat, minlength=n_bins * 2 * n_pix)
            frames = counts.astype(np.float32).reshape(n_bins, 2, height, width)
        else:
            # contiguous runs: one small bincount per bin stays in cache
            frames = np.empty((n_bins, 2, height, width), dtype=np.float32)
            for k in range(n_bins):
                counts = np.bincount(flat[starts[k] : starts[k + 1]], minlength=2 * n_pix)
                frames[k] = counts.reshape(2, height, width)
    if binary:
        frames = (frames > 0).astype(np.float32)
    if out_size is not None and resize == "frames":
        frames = resize_frames(frames, out_size)
    return frames


def downsample_coordinates(
    x: np.ndarray, y: np.ndarray, sensor: tuple[int, int], out_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Event coordinates on a ``sensor`` ``(W, H)`` mapped onto an ``out_size`` ``(H_out, W_out)``
    grid: ``x * W_out // W``, ``y * H_out // H`` (integers, so no float rounding puts an event on
    the wrong side of a pixel edge). Returns ``(x', y', (W_out, H_out))``."""
    h_out, w_out = (int(v) for v in out_size)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"out_size must be positive (H, W), got {out_size!r}")
    width, height = (int(v) for v in sensor)
    return (np.asarray(x, np.int64) * w_out) // width, (np.asarray(y, np.int64) * h_out) // height, (w_out, h_out)


def resize_frames(frames: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[T, C, H, W]`` frames to ``[T, C, H_out, W_out]`` (float32).

    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, without
    antialiasing; counts are not preserved (see :func:`to_frames`).
    """
    import torch
    import torch.nn.functional as F

    h_out, w_out = (int(v) for v in out_size)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"out_size must be positive (H, W), got {out_size!r}")
    if frames.shape[-2:] == (h_out, w_out):
        return frames.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    resized = F.interpolate(tensor, size=(h_out, w_out), mode="bilinear", align_corners=False)
    return resized.numpy()
