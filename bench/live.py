"""Live-stream latency at the DAVIS346 peak rate (12 Mev/s), small model, one core.

Run: python bench/live.py [--seconds 3] [--window-ms 50] [--source both|paced|dv]

The built-in small model (32x32, T=8, 10 classes; random weights, random BN statistics: timing
does not depend on training) is exported as the single-step stream model and run by
`tmkt.runtime.live.run_live` (onnxruntime on the CPU with one thread; this process pinned to one
core) on a DAVIS346 (346x260) stream of uniformly random events at 12 Mev/s, in 1 ms packets:

- `paced`: packets handed over in-process at real time (the source alone, no transport);
- `dv`: a dv-processing NetworkWriter in another process (pinned to another core where there is
  one) serves the packets on 127.0.0.1 at real time; tmkt reads them with NetworkReader, as from
  DV or a camera. The writer builds its stream first (dv-processing's push_back, ~1.6 Mev/s), so
  the dv run is shorter by default.

Reported per source: windows classified and dropped (the backlog limit is 8 windows), events
classified, events received of those sent (the rest were lost in transport), the sustained rate (events classified / wall time of the run) against 12 Mev/s,
and latency p50/p99 from the arrival of a window's last event to its prediction; and, because a
shared machine stretches wall times, CPU time: binning + onnxruntime per window (thread CPU, p50)
and this process's CPU seconds per second of stream received (below 1: one dedicated core keeps
up; the dropped windows' events were received but not binned). A run that falls behind drops
windows and says so; figures are from one run on one machine. Then what surrounds the
classification, in CPU s per stream s: the in-process source read alone, run_live on it with a
classifier that does nothing (windowing, queue), and the DV source read alone (what receiving the
stream costs before any binning).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer import DAVIS346, DAVIS_PEAK_EV_S, build  # noqa: E402

PACKET_US = 1000

WRITER = r"""
import os, sys, time
import numpy as np
import dv_processing as dv
port, seconds, rate, packet_us, core = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if core >= 0:
    os.sched_setaffinity(0, {core})
rng = np.random.default_rng(0)
n = int(rate * seconds)
t = np.sort(rng.integers(0, int(seconds * 1e6), n))
x, y, p = rng.integers(0, 346, n), rng.integers(0, 260, n), rng.integers(0, 2, n).astype(bool)
store = dv.EventStore()
for a, b, c, d in zip(t.tolist(), x.tolist(), y.tolist(), p.tolist()):
    store.push_back(a, b, c, d)
w = dv.io.NetworkWriter("127.0.0.1", port, dv.io.Stream.EventStream(0, "events", "DAVIS346", (346, 260)))
print("ready", flush=True)
since = None
while True:
    since = (since or time.monotonic()) if w.getClientCount() else None
    if since and time.monotonic() - since > 0.3:
        break
    time.sleep(0.005)
t0 = time.monotonic()
for k in range(int(seconds * 1e6) // packet_us):
    delay = (k + 1) * packet_us / 1e6 - (time.monotonic() - t0)
    if delay > 0:
        time.sleep(delay)
    part = store.sliceTime(k * packet_us, (k + 1) * packet_us)
    if part.size():
        w.writeEvents(part)
while w.getQueuedPacketCount():
    time.sleep(0.01)
time.sleep(5.0)  # let a reader that fell behind drain the socket before the connection goes
os._exit(0)
"""


def paced_source(seconds: float, rate: float):
    """DAVIS346 events at `rate` ev/s in 1 ms packets, each handed over when its millisecond is past."""
    from tmkt.data.events import EVENT_DTYPE
    from tmkt.runtime.live import Batch, Source

    per = int(rate * PACKET_US / 1e6)
    rng = np.random.default_rng(0)
    pool = np.empty(per * 100, EVENT_DTYPE)  # 100 ms of events, reused with shifted times
    pool["x"], pool["y"] = rng.integers(0, DAVIS346[0], len(pool)), rng.integers(0, DAVIS346[1], len(pool))
    pool["p"] = rng.integers(0, 2, len(pool))
    pool["t"] = np.sort(rng.integers(0, 100 * PACKET_US, len(pool)))

    def batches(stop: threading.Event):
        t0 = time.perf_counter()
        for k in range(int(seconds * 1e6) // PACKET_US):
            if stop.is_set():
                return
            delay = (k + 1) * PACKET_US / 1e6 - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            j = k % 100
            ev = pool[j * per : (j + 1) * per].copy()
            ev["t"] += (k - j) * PACKET_US
            yield Batch(ev, time.perf_counter())

    return Source("paced", batches)


def dv_source(seconds: float, rate: float, core: int):
    from tmkt.runtime.live import dv_network_source

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(tempfile.mkdtemp()) / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(seconds), str(rate), str(PACKET_US), str(core)],
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the DV writer did not start")
    return dv_network_source("127.0.0.1", port, connect_timeout=30), proc


def drain(source) -> dict:
    """The source alone, read in this thread and thrown away: what receiving the stream costs."""
    from tmkt.runtime.live import LiveError

    stop = threading.Event()
    n, first, last = 0, None, None
    c0 = time.process_time()
    try:
        for batch in source.open(stop):
            n += len(batch.events)
            first = first or batch.arrived
            last = batch.arrived
    except LiveError:  # the DV writer leaving at the end of its replay
        pass
    return {"received": n, "process_cpu_s": time.process_time() - c0, "wall_s": (last or 0) - (first or 0)}


class _NoClassifier:
    """Stands in for the classifier to measure what run_live costs around it (windows, queue)."""

    mode = "stream"

    def __init__(self, spec) -> None:
        self.spec = spec

    def zero_state(self, batch: int) -> dict:
        return {}

    def classify_window(self, events, state, frames_per_chunk=None):
        from tmkt.runtime.classifier import Prediction

        return Prediction("none", 0, 1.0, np.ones(1), np.zeros(1), 0.0, 0), state


def overhead(seconds: float, rate: float, window_ms: float, spec) -> tuple[float, float]:
    """CPU s per stream s of the paced source read alone, and of run_live with no classification."""
    from tmkt.runtime.live import run_live

    c0 = time.process_time()
    for _ in paced_source(seconds, rate).open(threading.Event()):
        pass
    source = (time.process_time() - c0) / seconds
    c0 = time.process_time()
    run_live(_NoClassifier(spec), paced_source(seconds, rate), int(window_ms * 1000), max_backlog=None)
    return source, (time.process_time() - c0) / seconds


def run(source, clf, window_ms: float) -> dict:
    from tmkt.runtime.live import LiveError, run_live

    compute: list[float] = []
    cpu: list[float] = []
    classify = clf.classify_window

    def timed_classify(*a, **k):  # CPU time of binning + onnxruntime, which a busy machine does not inflate
        c0 = time.thread_time()
        out = classify(*a, **k)
        cpu.append((time.thread_time() - c0) * 1e3)
        return out

    clf.classify_window = timed_classify
    c0 = time.process_time()
    try:
        s = run_live(clf, source, int(window_ms * 1000), max_backlog=8, on_window=lambda r: compute.append(r.compute_ms))
    except LiveError as e:  # the DV writer leaving at the end of its replay
        s = e.summary
    finally:
        del clf.classify_window
    d = s.to_dict()
    d["process_cpu_s"] = time.process_time() - c0
    d["compute_p50_ms"] = float(np.median(compute)) if compute else None
    d["compute_cpu_p50_ms"] = float(np.median(cpu)) if cpu else None
    d["received"] = d["events"] + d["dropped_events"]
    d["dropped_share"] = d["dropped_windows"] / max(1, d["windows"] + d["dropped_windows"])
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="stream length of the paced source")
    ap.add_argument("--dv-seconds", type=float, default=1.0, help="stream length of the DV network source")
    ap.add_argument("--window-ms", type=float, default=50.0)
    ap.add_argument("--rate", type=float, default=DAVIS_PEAK_EV_S, help="events/s (default: DAVIS346 peak, 12e6)")
    ap.add_argument("--source", default="both", choices=["both", "paced", "dv"])
    ap.add_argument("--no-reader", action="store_true", help="skip the DV source read alone (no classification)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from tmkt.export.onnx import export_onnx
    from tmkt.runtime.classifier import EventClassifier

    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})  # the classifier: reader thread + windows + onnxruntime, one core
    writer_core = cores[1] if len(cores) > 1 else -1
    results = []
    with tempfile.TemporaryDirectory() as d:
        _, graph = build("small", Path(d))
        path = export_onnx(graph, Path(d) / "small.stream.onnx", mode="stream", verify=False).path
        clf = EventClassifier(path, provider="cpu", threads=1)
        clf.classify_window(np.zeros(0, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")]), clf.zero_state(1))
        if args.source in ("both", "paced"):
            results.append(("in-process, real time", run(paced_source(args.seconds, args.rate), clf, args.window_ms)))
            costs = overhead(args.seconds, args.rate, args.window_ms, clf.spec)
        if args.source in ("both", "dv"):
            # loaded here rather than in the reader thread during the timed run (a few hundredths of a
            # second of CPU, but longer in wall time on a busy machine)
            import dv_processing  # noqa: F401

            src, proc = dv_source(args.dv_seconds, args.rate, writer_core)
            try:
                results.append(("DV NetworkWriter -> NetworkReader, 127.0.0.1", run(src, clf, args.window_ms)))
            finally:
                proc.kill()
                proc.wait()
            if not args.no_reader:
                src, proc = dv_source(args.dv_seconds, args.rate, writer_core)
                try:
                    reader = drain(src)
                finally:
                    proc.kill()
                    proc.wait()

    t = Table(title=f"live stream, small model (32x32, T=8), {args.window_ms:g} ms windows, "
                    f"{args.rate / 1e6:g} Mev/s DAVIS346, one core")
    for col in ("source", "windows", "dropped", "events", "received/sent", "Mev/s sustained", "x 12 Mev/s", "p50 ms", "p99 ms",
                "bin+ORT p50 ms", "bin+ORT CPU ms", "CPU s / stream s", "end"):
        t.add_column(col, justify="left" if col in ("source", "end") else "right")
    for name, r in results:
        rate = r["events_per_s"] or 0.0
        sent = int(args.rate * (args.seconds if name.startswith("in-process") else args.dv_seconds))
        t.add_row(name, str(r["windows"]), f"{r['dropped_windows']} ({r['dropped_share']:.0%})", f"{r['events']:,}",
                  f"{r['received'] / sent:.1%}",
                  f"{rate / 1e6:.2f}", f"{rate / DAVIS_PEAK_EV_S:.2f}",
                  f"{r['latency_p50_ms'] or float('nan'):.1f}", f"{r['latency_p99_ms'] or float('nan'):.1f}",
                  f"{r['compute_p50_ms'] or float('nan'):.1f}", f"{r['compute_cpu_p50_ms'] or float('nan'):.1f}",
                  f"{r['process_cpu_s'] / (r['received'] / args.rate):.2f}", r["end"])
    Console(width=220).print(t)
    if args.source in ("both", "paced"):
        print(f"in-process source read alone: {costs[0]:.2f} CPU s per stream s; run_live with no classification "
              f"(source, windows, queue): {costs[1]:.2f}")
    if args.source in ("both", "dv") and not args.no_reader:
        sent = args.rate * args.dv_seconds
        print(f"DV source read alone, no classification: {reader['received']:,} of {int(sent):,} events received, "
              f"{reader['process_cpu_s'] / (reader['received'] / args.rate):.2f} CPU s per stream s "
              f"(the share of the core that receiving costs before any binning)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
