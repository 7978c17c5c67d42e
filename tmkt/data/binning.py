"""Bin an event stream into frames ``[T, 2, H, W]``.

Channel 0 counts OFF events (p = 0), channel 1 counts ON events (p = 1); any p > 0 counts
as ON, so bool and {-1, 1} polarities work too.

Two ways to cut the stream into ``T`` bins, each event counted exactly once:

- ``by="time"``: ``T`` equal time bins over ``[t_first, t_last]``; event ``i`` goes to bin
  ``min(floor((t_i - t_first) * T / (t_last - t_first)), T - 1)``, so bins are half-open
  except the last, which also holds the last event (tonic's ``ToFrame(n_time_bins=T)`` drops
  it, and also drops the events after ``t_first + T * floor(span / T)``). All events fall in
  bin 0 when ``t_last == t_first``. The rule is exact for every integer timestamp, any span up
  to the full int64 or uint64 range (the bin edges ``t_first + ceil(k * span / T)`` are computed
  without overflow); float timestamps are rounded to whole microseconds first and must be finite
  and within int64, else :class:`TimestampRangeError`.
- ``by="count"``: ``T`` bins of (nearly) equal event count, in array order; event ``i`` of
  ``N`` goes to bin ``floor(i * T / N)``, so bin sizes differ by at most one.

How (one pass over the events, no per-event Python loop, nothing of the events' size copied but
one int64 index): the events are taken in segments of ``_SEGMENT`` (16k); for each, x, y and p
are read from the structured array into cache-sized buffers (sensor check, coordinate tables for
``resize="events"``) and the flat index ``((bin * 2 + p) * H + y) * W + x`` is written; one
``np.bincount`` counts them all (one per bin when the table of counts would exceed ``_CACHE_BYTES``:
a cache-sized table is faster to fill). For time-sorted events (what readers and live streams
deliver; checked on the way) each bin is a contiguous run found by ``searchsorted`` on the T - 1
edges; unsorted events get their bins from exact integer arithmetic. A recording may be given as
several arrays (the packets of a live window): they are binned as their concatenation, which is
never built. Events outside the sensor either raise ValueError (:func:`to_frames`) or are dropped
(:func:`bin_events` with ``outside="drop"``, as ``frames_from_events`` does): dropped events take
no part at all, not in ``t_first``/``t_last`` nor in the timestamp checks.

Limits, each a named error (a ``TmktError``, so the CLI prints one line): frames larger than
``max_bytes`` (default :data:`MAX_FRAME_BYTES` = 4 GiB, counting the int64 counts and the float32
frames) raise :class:`FrameSizeError` before anything is allocated; timestamps that are no
microsecond count (NaN, infinite, float beyond int64) raise :class:`TimestampRangeError`;
:func:`check_window_count` raises :class:`WindowCountError` for a recording that would be cut into
more than :data:`MAX_WINDOWS` windows (``tmkt infer --max-windows``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmkt.errors import TmktError

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_WINDOWS",
    "FrameSizeError",
    "TimestampRangeError",
    "WindowCountError",
    "bin_events",
    "check_window_count",
    "integer_times",
    "downsample_coordinates",
    "resize_frames",
    "to_frames",
]

MAX_FRAME_BYTES = 4 << 30  # frames + the counts they come from; raise with max_bytes=
_INT64_MIN, _INT64_END = -(2**63), 2**63
_BYTES_PER_CELL = 8 + 4  # np.bincount's int64 counts, then the float32 frames
_CACHE_BYTES = 1 << 20  # count tables above this are filled one bin at a time (see _count)


class TimestampRangeError(TmktError, ValueError):
    """Timestamps that cannot be binned as microseconds (NaN, infinite, beyond int64)."""


class FrameSizeError(TmktError, ValueError):
    """The frames asked for would not fit in memory (``T * 2 * H * W`` too large)."""


MAX_WINDOWS = 100_000  # windows of one recording (`tmkt infer --max-windows`): ~7 min of classification


class WindowCountError(TmktError, ValueError):
    """A recording (or a jump in a stream's time) would be cut into more windows than allowed."""


def check_window_count(first_us: int, last_us: int, window_us: int, max_windows: int | None) -> int:
    """Number of windows ``[t0 + k*w, t0 + (k+1)*w)`` from ``first_us`` that reach ``last_us``
    (Python integers: exact at any timestamp); WindowCountError when over ``max_windows``
    (None: no limit)."""
    n = (int(last_us) - int(first_us)) // int(window_us) + 1
    if max_windows is not None and n > max_windows:
        raise WindowCountError(
            f"{n:,} windows of {window_us:,} µs over {(int(last_us) - int(first_us)) / 1e6:,.6g} s, more than the "
            f"limit of {max_windows:,} (a longer --window-ms, or raise --max-windows)"
        )
    return n


def _check_frame_size(n_bins: int, height: int, width: int, max_bytes: int | None, out_cells: int = 0) -> None:
    if max_bytes is None:
        return
    cells = n_bins * 2 * height * width
    need = cells * _BYTES_PER_CELL + out_cells * 4
    if need > max_bytes:
        raise FrameSizeError(
            f"frames of {n_bins}x2x{height}x{width} need {need / 2**30:.3g} GiB, over the "
            f"{max_bytes / 2**30:.3g} GiB limit (fewer timesteps or a smaller input size, or raise max_bytes)"
        )


def integer_times(t: np.ndarray) -> np.ndarray:
    """Integer timestamps ``[N]``: integer fields as they are (a view), floats rounded to int64
    (TimestampRangeError when NaN, infinite or beyond int64), bools as int64."""
    t = np.asarray(t)
    if t.dtype.kind in "iu":
        return t
    if t.dtype.kind == "b":
        return t.astype(np.int64)
    if t.dtype.kind != "f":
        raise TimestampRangeError(f"timestamps must be numbers, got dtype {t.dtype}")
    lo, hi = (float(t.min()), float(t.max())) if len(t) else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise TimestampRangeError("timestamps hold NaN or infinite values")
    lo, hi = float(np.rint(lo)), float(np.rint(hi))
    if lo < _INT64_MIN or hi >= _INT64_END:
        raise TimestampRangeError(f"timestamps {lo:g}..{hi:g} us lie beyond the int64 microsecond range")
    return np.rint(t).astype(np.int64)


def _edges(t0: int, span: int, n_bins: int, dtype: np.dtype) -> np.ndarray:
    """Bin edges ``t0 + ceil(k * span / T)``, ``k = 1 .. T-1``, exactly, as ``dtype`` ``[T - 1]``.

    ``ceil(k * span / T) = k * q + ceil(k * r / T)`` with ``span = q * T + r``: every product stays
    below 2**64 (``k * q <= span``, ``k * r < T**2``), so uint64 arithmetic is exact, and adding
    ``t0`` modulo 2**64 gives the two's-complement edge for signed types (it lies in ``[t0, t1]``)."""
    k = np.arange(1, n_bins, dtype=np.uint64)
    q, r = divmod(span, n_bins)
    off = k * np.uint64(q) + (k * np.uint64(r) + np.uint64(n_bins - 1)) // np.uint64(n_bins)
    edges = off + np.uint64(t0 % 2**64)  # wraps modulo 2**64 (array arithmetic)
    if dtype.kind == "i":
        edges = edges.view(np.int64)
    return edges.astype(dtype)


def _time_bins_unsorted(t: np.ndarray, t0: int, span: int, n_bins: int) -> np.ndarray:
    """Time bin ``[N]`` (int64) of each of ``t`` (any order), ``t0 <= t <= t0 + span``, ``span > 0``."""
    if span * n_bins < 2**63:
        # (t - t0) * T stays below 2**63: exact integer arithmetic
        if t.dtype == np.uint64:
            rel = (t - np.uint64(t0)).astype(np.int64)
        else:
            rel = t.astype(np.int64)
            rel -= t0
        rel *= n_bins
        rel //= span
        return np.minimum(rel, n_bins - 1, out=rel)
    # spans near the full 64-bit range: look the events up among the exact edges
    return np.searchsorted(_edges(t0, span, n_bins, t.dtype), t, side="right").astype(np.int64)


_SEGMENT = 1 << 14  # events per step: temporaries stay in L1/L2 (2**14 measured fastest), only the flat index is [N]


class _Unsorted(Exception):
    """Raised inside the one-pass loop when the events turn out not to be time-sorted."""


class _Outside(Exception):
    """Raised inside the one-pass loop when an event lies outside the sensor."""


def _load_coordinates(seg: np.ndarray, x: np.ndarray, y: np.ndarray, dx: int, dy: int, size) -> None:
    """x, y of ``seg`` into the int64 buffers ``x``, ``y`` (shifted by dx, dy); raise _Outside when
    one lies outside the sensor ``size`` (W, H)."""
    np.copyto(x, seg["x"], casting="unsafe")
    np.copyto(y, seg["y"], casting="unsafe")
    if dx or dy:
        x -= dx
        y -= dy
    # one max per axis: seen as unsigned, a negative coordinate is huge, so 0 <= x < W is u(x) < W
    if x.view(np.uint64).max() >= size[0] or y.view(np.uint64).max() >= size[1]:
        raise _Outside


def _segments(pieces: list[np.ndarray]):
    """``(offset, events)`` views of at most ``_SEGMENT`` events, in order over all pieces."""
    offset = 0
    for piece in pieces:
        for a in range(0, len(piece), _SEGMENT):
            seg = piece[a : a + _SEGMENT]
            yield offset, seg
            offset += len(seg)


def _count(pieces, n, sensor, n_bins, by, out_size, shift, ordered) -> np.ndarray:
    """Counts ``[T, 2, H, W]`` float32 of ``n`` events in ``pieces`` (see :func:`bin_events`).

    One pass over the events in segments: x, y, p (and t) are read from the structured arrays
    into small reused buffers and the flat index ``(bin * 2 + p) * H * W + y * W + x`` of each
    event is written into ``flat`` ``[N]`` int64, then counted. ``ordered``: take the events as
    time-sorted (bins are then contiguous runs, found with ``searchsorted`` per segment); raises
    ``_Unsorted`` when they are not, and the caller runs again with ``ordered=False``.
    Raises ``_Outside`` when an event lies outside the sensor."""
    width, height = sensor
    x_map = y_map = None
    if out_size is not None:  # coordinates scaled through tables (see downsample_coordinates)
        x_map, y_map, (grid_w, grid_h) = _coordinate_maps(sensor, out_size)
        y_map = y_map * grid_w
    else:
        grid_w, grid_h = width, height
    n_pix = grid_h * grid_w
    stride = 2 * n_pix
    dx = dy = 0
    if shift:
        dx = min(int(p["x"].min()) for p in pieces)
        dy = min(int(p["y"].min()) for p in pieces)

    runs = by == "count" or ordered  # bins are contiguous runs of the array
    per_bin = runs and n_bins * stride * 8 > _CACHE_BYTES
    starts = np.zeros(n_bins + 1, dtype=np.int64)
    starts[-1] = n
    t0 = span = 0
    edges = None
    if by == "count":
        # event i is in bin floor(i * T / N), so bin k starts at ceil(k * N / T)
        global_starts = -((-np.arange(n_bins + 1, dtype=np.int64) * n) // n_bins)
    elif ordered:
        try:
            t0 = int(integer_times(pieces[0]["t"][:1])[0])
            span = int(integer_times(pieces[-1]["t"][-1:])[0]) - t0
        except TimestampRangeError:  # judged below, segment by segment, after the coordinates:
            raise _Unsorted from None  # an event dropped for lying outside the sensor may hold it
        if span < 0:
            raise _Unsorted
    else:
        lo = hi = None
        for _, seg in _segments(pieces):
            xb = np.empty(len(seg), dtype=np.int64)
            _load_coordinates(seg, xb, np.empty_like(xb), dx, dy, sensor)  # coordinates first (see above)
            t = integer_times(seg["t"])
            lo = int(t.min()) if lo is None else min(lo, int(t.min()))
            hi = int(t.max()) if hi is None else max(hi, int(t.max()))
        t0, span = lo, hi - lo
    bin_offsets = np.arange(n_bins, dtype=np.int64) * stride

    flat = np.empty(n, dtype=np.int64)
    xb = np.empty(min(n, _SEGMENT), dtype=np.int64)
    yb = np.empty_like(xb)
    last_t = None
    for offset, seg in _segments(pieces):
        m = len(seg)
        x, y, f = xb[:m], yb[:m], flat[offset : offset + m]
        _load_coordinates(seg, x, y, dx, dy, sensor)
        if x_map is not None:
            x_map.take(x, out=x, mode="clip")  # inside the sensor: clip never acts
            y_map.take(y, out=y, mode="clip")
        else:
            y *= grid_w
        np.greater(seg["p"], 0, out=f, casting="unsafe")
        f *= n_pix
        f += y
        f += x
        if by == "count":
            cuts = np.clip(global_starts[1:-1] - offset, 0, m)
        else:
            t = integer_times(seg["t"])
            if not runs:
                if span > 0:
                    b = _time_bins_unsorted(t, t0, span, n_bins)
                    b *= stride
                    f += b
                continue
            if (last_t is not None and last_t > t[0]) or (m > 1 and not bool((t[1:] >= t[:-1]).all())):
                raise _Unsorted
            last_t = t[-1]
            if span == 0:
                cuts = np.full(n_bins - 1, m, dtype=np.int64)
            else:
                if edges is None or edges.dtype != t.dtype:
                    edges = _edges(t0, span, n_bins, t.dtype)
                cuts = np.searchsorted(t, edges, side="left")
        starts[1:-1] += cuts
        if not per_bin and n_bins > 1:
            f += np.repeat(bin_offsets, np.diff(np.concatenate(([0], cuts, [m]))))
    if per_bin:
        # large frames: one bincount per bin keeps its counts in cache (one bincount over all bins
        # writes a table larger than the cache, about 2x slower)
        frames = np.empty((n_bins, 2, grid_h, grid_w), dtype=np.float32)
        for k in range(n_bins):
            frames[k] = np.bincount(flat[starts[k] : starts[k + 1]], minlength=stride).reshape(2, grid_h, grid_w)
        return frames
    counts = np.bincount(flat, minlength=n_bins * stride)
    return counts.astype(np.float32).reshape(n_bins, 2, grid_h, grid_w)


def _bin_inside(pieces, sensor, n_bins, by, out_size, shift) -> np.ndarray:
    """Counts of the events inside the sensor (after any shift), binned alone: the rare path where
    some are outside, with a copy of the events."""
    width, height = sensor
    x = np.concatenate([p["x"] for p in pieces]).astype(np.int64)
    y = np.concatenate([p["y"] for p in pieces]).astype(np.int64)
    if shift:
        x -= x.min()
        y -= y.min()
    keep = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    t = np.concatenate([p["t"] for p in pieces])[keep]
    inside = np.empty(len(t), dtype=[("x", "<i8"), ("y", "<i8"), ("t", t.dtype), ("p", "u1")])
    inside["x"], inside["y"], inside["t"] = x[keep], y[keep], t
    inside["p"] = np.concatenate([np.asarray(p["p"]) > 0 for p in pieces])[keep]
    if len(inside) == 0:
        grid = (height, width) if out_size is None else tuple(int(v) for v in out_size)
        return np.zeros((n_bins, 2, *grid), dtype=np.float32)
    return _count_any_order([inside], len(inside), sensor, n_bins, by, out_size, False)


def _count_any_order(pieces, n, sensor, n_bins, by, out_size, shift) -> np.ndarray:
    try:
        return _count(pieces, n, sensor, n_bins, by, out_size, shift, ordered=True)
    except _Unsorted:
        return _count(pieces, n, sensor, n_bins, by, out_size, shift, ordered=False)


def bin_events(
    events: np.ndarray | Sequence[np.ndarray],
    sensor_size,
    n_bins: int,
    *,
    by: str = "time",
    binary: bool = False,
    out_size: tuple[int, int] | None = None,
    resize: str = "frames",
    outside: str = "error",
    shift_to_origin: bool = False,
    max_bytes: int | None = MAX_FRAME_BYTES,
) -> np.ndarray:
    """:func:`to_frames` with the choices of ``tmkt.data.spec.frames_from_events`` as arguments.

    Args:
        events: ``[N]`` structured array (fields x, y, t, p), or a sequence of such arrays of one
            dtype, binned as their concatenation (without building it).
        outside: ``"error"`` (ValueError) or ``"drop"``: what to do with events outside the
            sensor; dropped events take no part in the binning (``t_first``/``t_last``, counts).
        shift_to_origin: subtract the smallest x and y (over all events) first.
        max_bytes: :class:`FrameSizeError` when the frames (with their int64 counts) would need
            more; None for no limit.

    The other arguments and the result are those of :func:`to_frames`.
    """
    size = tuple(int(v) for v in sensor_size)
    if len(size) not in (2, 3) or (len(size) == 3 and size[2] != 2):
        raise ValueError(f"sensor_size must be (W, H) or (W, H, 2), got {sensor_size!r}")
    width, height = size[0], size[1]
    if width < 1 or height < 1:
        raise ValueError(f"sensor_size must be positive, got {sensor_size!r}")
    if resize not in ("frames", "events"):
        raise ValueError(f"resize must be 'frames' or 'events', got {resize!r}")
    if by not in ("time", "count"):
        raise ValueError(f"by must be 'time' or 'count', got {by!r}")
    if outside not in ("error", "drop"):
        raise ValueError(f"outside must be 'error' or 'drop', got {outside!r}")
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    grid_h, grid_w = height, width  # where events are counted
    out_cells = 0
    count_size = None
    if out_size is not None:
        h_out, w_out = (int(v) for v in out_size)
        if h_out < 1 or w_out < 1:
            raise ValueError(f"out_size must be positive (H, W), got {out_size!r}")
        if resize == "events":
            grid_h, grid_w = count_size = (h_out, w_out)
        else:
            out_cells = n_bins * 2 * h_out * w_out
    _check_frame_size(n_bins, grid_h, grid_w, max_bytes, out_cells)

    pieces = [events] if isinstance(events, np.ndarray) else list(events)
    pieces = [p for p in (np.asarray(p) for p in pieces) if len(p)]
    if len({p.dtype for p in pieces}) > 1:
        raise ValueError(f"event arrays binned together must share one dtype, got {sorted({str(p.dtype) for p in pieces})}")
    n = sum(len(p) for p in pieces)
    if n == 0:
        frames = np.zeros((n_bins, 2, grid_h, grid_w), dtype=np.float32)
    else:
        try:
            frames = _count_any_order(pieces, n, (width, height), n_bins, by, count_size, shift_to_origin)
        except _Outside:
            if outside == "error":
                raise ValueError(f"event coordinates fall outside the sensor {width}x{height}") from None
            frames = _bin_inside(pieces, (width, height), n_bins, by, count_size, shift_to_origin)
    if binary:
        frames = (frames > 0).astype(np.float32)
    if out_size is not None and resize == "frames":
        frames = resize_frames(frames, out_size)
    return frames


def to_frames(
    events: np.ndarray,
    sensor_size,
    n_bins: int,
    *,
    by: str = "time",
    binary: bool = False,
    out_size: tuple[int, int] | None = None,
    resize: str = "frames",
    max_bytes: int | None = MAX_FRAME_BYTES,
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
        max_bytes: :class:`FrameSizeError` above this many bytes of frames (see the module
            docstring); None for no limit.

    Returns:
        float32 ``[T, 2, H, W]`` (or ``[T, 2, H_out, W_out]``); channel 0 = OFF, 1 = ON.
        An empty stream gives zeros of the same shape.

    Raises:
        ValueError: events outside the sensor, bad arguments.
        TimestampRangeError: NaN, infinite or beyond-int64 float timestamps.
        FrameSizeError: frames over ``max_bytes``.
    """
    return bin_events(events, sensor_size, n_bins, by=by, binary=binary, out_size=out_size, resize=resize,
                      max_bytes=max_bytes)


def _coordinate_maps(sensor: tuple[int, int], out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Tables ``x -> x * W_out // W`` ``[W]`` and ``y -> y * H_out // H`` ``[H]`` (int64) and ``(W_out, H_out)``."""
    h_out, w_out = (int(v) for v in out_size)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"out_size must be positive (H, W), got {out_size!r}")
    width, height = (int(v) for v in sensor)
    x_map = (np.arange(width, dtype=np.int64) * w_out) // width
    y_map = (np.arange(height, dtype=np.int64) * h_out) // height
    return x_map, y_map, (w_out, h_out)


def downsample_coordinates(
    x: np.ndarray, y: np.ndarray, sensor: tuple[int, int], out_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Event coordinates on a ``sensor`` ``(W, H)`` mapped onto an ``out_size`` ``(H_out, W_out)``
    grid: ``x * W_out // W``, ``y * H_out // H`` (integers, so no float rounding puts an event on
    the wrong side of a pixel edge). Coordinates must lie on the sensor (they index a table of the
    mapped values). Returns ``(x', y', (W_out, H_out))`` (int64)."""
    x_map, y_map, grid = _coordinate_maps(sensor, out_size)
    return x_map.take(np.asarray(x)), y_map.take(np.asarray(y)), grid


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
