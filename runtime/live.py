"""Classify live event streams window by window, with the stream model's state carried on.

    src = dv_network_source("127.0.0.1", 7777)        # iniVation DV software / camera over TCP
    src = follow_file_source("rec.raw")               # a file still being written (tail -f)
    src = dv_camera_source()                          # an attached iniVation camera (untested here)
    summary = run_live(EventClassifier("model-stream.onnx"), src, window_us=50_000, on_window=print)

A source yields `Batch`es (time-sorted `EVENT_DTYPE` events and the wall-clock time they
arrived) from a reader thread. `run_live` cuts them into the windows of `split_windows`
(`[t0 + k*w, t0 + (k+1)*w)` from the first event; empty windows inside the stream kept; the last,
partial window flushed at the end), so that a recording streamed live gives the predictions of
`tmkt infer --window-ms W` on that recording. A window is classified once an event at or past its
end arrives (or the stream ends); its latency runs from the arrival of its last event (for an
empty window, of the event that closed it) to its prediction.

Falling behind: when more than `max_backlog` complete windows wait, the oldest are dropped
(counted, reported to `on_drop` and in the summary, never hidden); the membranes then run on
from the last classified window. Ctrl-C (KeyboardInterrupt) ends a run cleanly with its summary.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tmkt.data.events import EVENT_DTYPE
from tmkt.errors import TmktError

__all__ = [
    "Batch",
    "LiveError",
    "LiveSummary",
    "Source",
    "WindowResult",
    "Windower",
    "dv_camera_source",
    "dv_network_source",
    "follow_file_source",
    "parse_live_url",
    "run_live",
]


class LiveError(TmktError, RuntimeError):
    """A live source cannot be opened or read (refused, not a DV stream, closed, garbled)."""


@dataclass(frozen=True)
class Batch:
    """Events `[N]` (EVENT_DTYPE, time-sorted) and when they arrived (`time.perf_counter()`)."""

    events: np.ndarray
    arrived: float


@dataclass(frozen=True)
class Source:
    """A live source: `open(stop)` returns the iterator of batches (runs in the reader thread).

    `closed_is_error`: the stream ending is a failure (a network writer that disconnects), not a
    normal end (a followed file that stopped growing for `idle_timeout`)."""

    name: str
    open: Callable[[threading.Event], Iterator[Batch]]
    closed_is_error: bool = False


@dataclass(frozen=True)
class WindowResult:
    """One classified window. Times: stream µs; latency: last event's arrival -> prediction."""

    window: int
    t_start_us: int
    t_end_us: int
    events: int
    label: str
    index: int
    score: float
    latency_ms: float
    compute_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LiveSummary:
    """What a live run did. `end`: "ended" | "interrupted" | "closed" | "error".
    `events_per_s` in `to_dict`: events classified per second from the first event's arrival to
    the last prediction. Latencies and the active span leave out the last, partial window that
    the end of the stream flushes (its wait is the stream's end)."""

    source: str
    window_ms: float
    windows: int = 0
    events: int = 0
    dropped_windows: int = 0
    dropped_events: int = 0
    outside_sensor: int = 0
    wall_s: float = 0.0
    active_s: float = 0.0  # first event's arrival -> last prediction (no connection wait, no idle tail)
    stream_s: float = 0.0
    end: str = "ended"
    error: str | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    active_events: int = field(default=0, repr=False)  # events of the windows in `active_s`

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("latencies_ms", "active_events")}
        d["latency_p50_ms"], d["latency_p99_ms"] = self.percentile(50), self.percentile(99)
        d["events_per_s"] = self.active_events / self.active_s if self.active_s > 0 else None
        return d


# ---------------------------------------------------------------- windows


@dataclass
class _Window:
    index: int
    events: list[np.ndarray]
    last_arrival: float
    final: bool = False  # flushed at the end of the stream, not closed by a later event


class Windower:
    """Cuts batches into the windows of `tmkt.runtime.classifier.split_windows`.

    A window keeps the batches' arrays (or views of them) as they came, never a concatenation:
    the binning takes the list. `max_windows`: a time jump that would complete more windows at
    once raises WindowCountError (None: no limit), instead of creating them one by one."""

    def __init__(self, window_us: int, max_windows: int | None = None) -> None:
        if window_us <= 0:
            raise LiveError(f"window must be > 0 µs, got {window_us}")
        self.w = int(window_us)
        self.max_windows = max_windows
        self.t0: int | None = None
        self.cur: _Window | None = None
        self.last_t: int | None = None

    def bounds(self, index: int) -> tuple[int, int]:
        assert self.t0 is not None
        return self.t0 + index * self.w, self.t0 + (index + 1) * self.w

    def push(self, batch: Batch) -> list[_Window]:
        """Add a batch; return the windows it completed (in order, empty ones included)."""
        from tmkt.data.binning import WindowCountError, integer_times

        ev = batch.events
        if len(ev) == 0:
            return []
        t = integer_times(ev["t"])
        first, last = int(t[0]), int(t[-1])
        if (self.last_t is not None and first < self.last_t) or (len(t) > 1 and not bool((t[1:] >= t[:-1]).all())):
            raise LiveError("the stream's timestamps go backwards; live windows need time-sorted events")
        self.last_t = last
        if self.t0 is None:
            self.t0 = first
            self.cur = _Window(0, [], batch.arrived)
        # window indices in Python integers (no overflow at any timestamp); a batch usually lies
        # in one window, so it is kept whole; otherwise it is cut where windows end (searchsorted)
        k_first, k_last = (first - self.t0) // self.w, (last - self.t0) // self.w
        if self.max_windows is not None and k_last - self.cur.index > self.max_windows:
            raise WindowCountError(
                f"the stream's time jumps by {k_last - self.cur.index:,} windows of {self.w:,} µs at once "
                f"(t={last} µs), more than the limit of {self.max_windows:,}"
            )
        if k_first == k_last:
            parts = [(k_first, ev)]
        else:
            ends = [self.t0 + k * self.w for k in range(k_first + 1, k_last + 1)]
            cuts = np.searchsorted(t, np.array(ends, dtype=t.dtype), side="left")
            bounds = [0, *cuts.tolist(), len(ev)]
            parts = [(k_first + j, ev[a:b]) for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
        done: list[_Window] = []
        for idx, part in parts:
            while self.cur.index < idx:  # the current window is complete; empty ones follow
                done.append(self.cur)
                self.cur = _Window(self.cur.index + 1, [], batch.arrived)
            self.cur.events.append(part)
            self.cur.last_arrival = batch.arrived
        return done

    def flush(self) -> list[_Window]:
        """At the end of the stream: the last (partial) window, if any event reached it."""
        if self.cur is None or not self.cur.events:
            return []
        self.cur.final = True
        out, self.cur = [self.cur], None
        return out


# ---------------------------------------------------------------- running


_END = object()


def _reader(source: Source, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for batch in source.open(stop):
            if stop.is_set():
                return
            q.put(batch)
        q.put(_END)
    except Exception as e:  # handed to the consumer, which raises it in the caller's thread
        q.put(e if isinstance(e, LiveError) else LiveError(f"{source.name}: {type(e).__name__}: {e}"))


def run_live(
    clf,
    source: Source,
    window_us: int,
    *,
    on_window: Callable[[WindowResult], None] | None = None,
    on_drop: Callable[[list[int], int], None] | None = None,
    max_backlog: int | None = 8,
    frames_per_chunk: int | None = None,
    stop: threading.Event | None = None,
    max_windows: int | None = None,
) -> LiveSummary:
    """Classify `source` live with `clf` (a stream-mode `EventClassifier`) until the stream ends,
    `stop` is set, or Ctrl-C. Windows of `window_us` µs, each binned into `frames_per_chunk`
    (default T) frames, membranes carried from window to window.

    `on_window(result)` is called for each classified window; `on_drop(window indices, events)`
    when windows are dropped because more than `max_backlog` complete windows waited (None: never
    drop). `max_windows`: a time jump of more windows than this at once ends the run with a
    LiveError (None: `tmkt.data.binning.MAX_WINDOWS`). Returns the summary; a source that
    fails raises LiveError after its summary is filled (`err.summary`)."""
    from tmkt.data.binning import MAX_WINDOWS, WindowCountError
    from tmkt.runtime.classifier import events_outside_sensor

    if clf.mode != "stream":
        raise LiveError(f"{clf.path}: live streams need a stream-mode model (tmkt export --mode stream)")
    stop = stop or threading.Event()
    summary = LiveSummary(source.name, window_us / 1000)
    win = Windower(window_us, MAX_WINDOWS if max_windows is None else max_windows)
    q: queue.Queue = queue.Queue()
    thread = threading.Thread(target=_reader, args=(source, q, stop), name="tmkt-live-reader", daemon=True)
    state = clf.zero_state(1)
    start = time.perf_counter()
    pending: list[_Window] = []
    failure: LiveError | None = None
    first_arrival: float | None = None
    first_batch_arrival: float | None = None

    sensor_w, sensor_h = clf.spec.sensor_size[0], clf.spec.sensor_size[1]
    shifts = bool(clf.spec.binning.get("shift_to_origin", False))

    def outside(pieces: list[np.ndarray]) -> int:
        # the common case first: two max() calls per packet instead of a full count over the window
        if not shifts and all(int(e["x"].max()) < sensor_w and int(e["y"].max()) < sensor_h for e in pieces):
            return 0
        return events_outside_sensor(np.concatenate(pieces), clf.spec)

    def classify(w: _Window) -> None:
        nonlocal state, first_arrival
        # the window's packets go to the binning as they came (no concatenated copy of the window)
        pieces = w.events or [np.empty(0, EVENT_DTYPE)]
        n_events = sum(len(e) for e in pieces)
        summary.outside_sensor += outside(pieces) if n_events else 0
        pred, state = clf.classify_window(pieces, state, frames_per_chunk)
        now = time.perf_counter()
        t0, t1 = win.bounds(w.index)
        res = WindowResult(w.index, t0, t1, n_events, pred.label, pred.index, pred.score,
                           (now - w.last_arrival) * 1e3, pred.latency_ms)
        summary.windows += 1
        summary.events += n_events
        if first_arrival is None:
            first_arrival = min(w.last_arrival, first_batch_arrival or w.last_arrival)
        if not w.final:  # the last, partial window waited for the stream's end, not for tmkt
            summary.latencies_ms.append(res.latency_ms)
            summary.active_s = now - first_arrival
            summary.active_events += n_events
        if on_window is not None:
            on_window(res)

    thread.start()
    try:
        ended = False
        while not ended and not stop.is_set():
            try:
                items = [q.get(timeout=0.05)]
            except queue.Empty:
                continue
            while True:  # everything that arrived meanwhile: the backlog is judged on all of it
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is _END:
                    ended = True
                elif isinstance(item, LiveError):
                    failure, ended = item, True
                else:
                    if first_batch_arrival is None and len(item.events):
                        first_batch_arrival = item.arrived
                    try:
                        pending += win.push(item)
                    except (LiveError, WindowCountError) as e:  # time going backwards, or jumping too far
                        failure, ended = e if isinstance(e, LiveError) else LiveError(f"{source.name}: {e}"), True
                        break
            if ended:
                pending += win.flush()
            if max_backlog is not None and len(pending) > max_backlog:
                drop, pending = pending[: len(pending) - max_backlog], pending[len(pending) - max_backlog :]
                n_ev = sum(len(e) for w in drop for e in w.events)
                summary.dropped_windows += len(drop)
                summary.dropped_events += n_ev
                if on_drop is not None:
                    on_drop([w.index for w in drop], n_ev)
            while pending and not stop.is_set():  # an interrupt ends the run between windows
                classify(pending.pop(0))
        if failure is not None:
            summary.end, summary.error = ("closed" if getattr(failure, "closed", False) else "error"), str(failure)
        elif stop.is_set():
            summary.end = "interrupted"
    except KeyboardInterrupt:
        summary.end = "interrupted"
    finally:
        stop.set()
        summary.wall_s = time.perf_counter() - start
        if win.t0 is not None and win.last_t is not None:
            summary.stream_s = (win.last_t - win.t0) / 1e6
    if failure is not None:
        failure.summary = summary  # type: ignore[attr-defined]
        raise failure
    return summary


# ---------------------------------------------------------------- DV (dv-processing)


def _dv():
    try:
        import dv_processing as dv
    except ImportError as e:
        raise LiveError(f"dv-processing is not installed ({e}); install it with `pip install 'tmkt[live]'`") from None
    return dv


# dv-processing's event record (timestamp i8, x i2, y i2, polarity i1 in 16 bytes), fields renamed
_DV_LAYOUT = {"formats": ["<i8", "<i2", "<i2", "i1"], "offsets": [0, 8, 10, 12], "itemsize": 16}
_DV_DTYPE = np.dtype({"names": ["timestamp", "x", "y", "polarity"], **_DV_LAYOUT})
_DV_AS_EVENTS = np.dtype({"names": ["t", "x", "y", "p"], **_DV_LAYOUT})


def _dv_events(store) -> np.ndarray:
    """Events of a dv.EventStore with fields t, x, y, p: a zero-copy view of dv-processing's own
    records (12 Mev/s is 190 MB/s: a copy per packet costs a good share of a core)."""
    a = store.numpy()
    if a.dtype == _DV_DTYPE:
        return a.view(_DV_AS_EVENTS)
    out = np.empty(len(a), EVENT_DTYPE)
    out["x"], out["y"], out["t"], out["p"] = a["x"], a["y"], a["timestamp"], a["polarity"] > 0
    return out


def parse_live_url(url: str) -> tuple[str, int]:
    """`tcp://HOST:PORT` or `HOST:PORT` -> (host, port)."""
    m = re.fullmatch(r"(?:tcp://)?\[?([^\]\s/]+?)\]?:(\d{1,5})/?", url.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise LiveError(f"--live takes tcp://HOST:PORT (a DV network stream), got {url!r}")
    return m.group(1), int(m.group(2))


def _probe_dv_header(host: str, port: int, timeout: float) -> None:
    """Check, with a timeout, that the server speaks the DV network protocol before dv-processing
    connects: its NetworkReader waits for the header holding the GIL and cannot be interrupted,
    so a silent or garbage-sending server would hang the process. DV sends a little-endian uint32
    size, then a flatbuffer whose identifier is "IOHE" (the IOHeader)."""
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            head = b""
            deadline = time.monotonic() + timeout
            while len(head) < 12 and time.monotonic() < deadline:
                chunk = s.recv(12 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        raise LiveError(f"{where}: no DV stream header within {timeout:g} s (is it a DV network stream?)") from None
    except OSError as e:
        raise LiveError(f"{where}: cannot connect ({e.strerror or e})") from None
    if len(head) < 12:
        if not head:
            raise LiveError(f"{where}: the server closed the connection before sending a DV stream header")
        raise LiveError(f"{where}: no DV stream header within {timeout:g} s (got {len(head)} bytes)")
    size = struct.unpack("<I", head[:4])[0]
    if head[8:12] != b"IOHE" or not 8 <= size <= 1 << 20:
        raise LiveError(f"{where}: not a DV network stream (first bytes {head.hex()}; expected a DV IOHeader)")


def dv_network_source(host: str, port: int, *, connect_timeout: float = 5.0, poll_s: float = 0.0005) -> Source:
    """Events from a DV network stream (dv-processing `NetworkReader`; what DV and
    `dv.io.NetworkWriter` serve over TCP). The writer disconnecting is reported as an error."""

    def batches(stop: threading.Event) -> Iterator[Batch]:
        dv = _dv()
        _probe_dv_header(host, port, connect_timeout)
        try:
            reader = dv.io.NetworkReader(host, port)
        except RuntimeError as e:
            raise LiveError(f"{host}:{port}: {str(e).split(' [')[0]}") from None
        if not reader.isEventStreamAvailable():
            raise LiveError(f"{host}:{port}: the DV stream carries no events")
        while not stop.is_set():
            store = reader.getNextEventBatch()
            if store is not None:
                if store.size():
                    yield Batch(_dv_events(store), time.perf_counter())
                continue
            if not reader.isRunning():
                err = LiveError(f"the DV stream at {host}:{port} was closed by the writer")
                err.closed = True  # type: ignore[attr-defined]
                raise err
            time.sleep(poll_s)

    return Source(f"tcp://{host}:{port}", batches, closed_is_error=True)


def dv_camera_source(serial: str | None = None, *, poll_s: float = 0.0005) -> Source:
    """Events from an attached iniVation camera (`dv.io.camera.open`). Untested without hardware."""

    def batches(stop: threading.Event) -> Iterator[Batch]:
        dv = _dv()
        try:
            cam = dv.io.camera.open(serial) if serial else dv.io.camera.open()
        except RuntimeError as e:
            raise LiveError(f"cannot open a camera{f' with serial {serial}' if serial else ''}: {e}") from None
        if not cam.isEventStreamAvailable():
            raise LiveError(f"camera {cam.getCameraName()} has no event stream")
        while not stop.is_set() and cam.isRunning():
            store = cam.getNextEventBatch()
            if store is not None and store.size():
                yield Batch(_dv_events(store), time.perf_counter())
            elif store is None:
                time.sleep(poll_s)
        if not stop.is_set():
            err = LiveError(f"camera {cam.getCameraName()} stopped")
            err.closed = True  # type: ignore[attr-defined]
            raise err

    return Source(f"camera:{serial or 'first'}", batches, closed_is_error=True)


# ---------------------------------------------------------------- growing files (tail -f)


def follow_file_source(path: str | os.PathLike, *, poll_s: float = 0.01, idle_timeout: float | None = None) -> Source:
    """Events appended to a file that is still being written, read as they land (like `tail -f`):
    Prophesee `.raw` (EVT 2.0 / 3.0; partial words and event groups carried over) and text files
    (`.csv` / `.txt`: one event `t,x,y,p` per line, commas or spaces; `#` comments). The stream ends
    when the file has not grown for `idle_timeout` seconds (None: until stopped)."""
    from tmkt.runtime.follow import decoder_for

    p = Path(path)

    def batches(stop: threading.Event) -> Iterator[Batch]:
        if not p.is_file():
            raise LiveError(f"{p}: no such file")
        dec = decoder_for(p)
        last_growth = time.monotonic()
        with open(p, "rb") as fh:
            while not stop.is_set():
                data = fh.read(1 << 20)
                if data:
                    last_growth = time.monotonic()
                    ev = dec.feed(data)
                    if len(ev):
                        yield Batch(ev, time.perf_counter())
                    continue
                if os.path.getsize(p) < fh.tell():
                    raise LiveError(f"{p}: the file shrank while being followed (truncated or replaced)")
                if idle_timeout is not None and time.monotonic() - last_growth > idle_timeout:
                    ev = dec.finish()
                    if len(ev):
                        yield Batch(ev, time.perf_counter())
                    return
                time.sleep(poll_s)

    return Source(f"follow:{p}", batches)
