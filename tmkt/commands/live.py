"""The live half of `tmkt infer`: --live tcp://HOST:PORT, --follow FILE, --camera.

One line per window (stream time, class, score, latency from the window's last event to its
prediction), or one JSON object per line with --json; at the end (stream closed, file idle,
Ctrl-C) a summary: windows, events, p50/p99 latency, dropped windows. The work is in
`tmkt.runtime.live`.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from tmkt.commands import fail

DEFAULT_WINDOW_MS = 50.0


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_live_command(
    model: Path,
    provider: str,
    window_ms: Optional[float],
    as_json: bool,
    *,
    live: Optional[str],
    follow: Optional[Path],
    camera: bool,
    camera_serial: Optional[str],
    idle_timeout: Optional[float],
    connect_timeout: float,
    max_backlog: int,
    max_windows: int | None = None,
) -> None:
    from tmkt.errors import TmktError
    from tmkt.runtime.classifier import EventClassifier
    from tmkt.runtime.live import (
        LiveError,
        dv_camera_source,
        dv_network_source,
        follow_file_source,
        parse_live_url,
        run_live,
    )

    window_ms = DEFAULT_WINDOW_MS if window_ms is None else window_ms
    try:
        if live is not None:
            source = dv_network_source(*parse_live_url(live), connect_timeout=connect_timeout)
        elif follow is not None:
            from tmkt.runtime.follow import decoder_for

            decoder_for(follow)  # an unknown suffix fails now, not in the reader thread
            source = follow_file_source(follow, idle_timeout=idle_timeout)
        else:
            source = dv_camera_source(camera_serial)
        clf = EventClassifier(model, provider=provider)
    except TmktError as e:
        fail(str(e))
    if clf.mode != "stream":
        fail(f"{model.name} is an unrolled model: live streams need `tmkt export --mode stream`")

    def on_window(r) -> None:
        if as_json:
            _emit(r.to_dict())
        else:
            t = (r.window + 1) * window_ms / 1e3  # the window's end, from the stream's first event
            typer.echo(f"t={t:9.3f} s  window {r.window:6d}  {r.label:>12}  score {r.score:.3f}  "
                       f"latency {r.latency_ms:7.2f} ms  events {r.events:,}")

    def on_drop(indices, n_events) -> None:
        msg = (f"dropped {len(indices)} windows ({indices[0]}..{indices[-1]}, {n_events:,} events): "
               "falling behind the stream")
        if as_json:
            _emit({"dropped": indices, "events": n_events})
        else:
            typer.echo(f"warning: {msg}", err=True)

    if not as_json:
        typer.echo(f"# {source.name}: {model.name} (T={clf.timesteps}) on {clf.provider}, windows of {window_ms:g} ms; "
                   "Ctrl-C ends", err=True)
    error = None
    # Ctrl-C / SIGTERM set a flag that the loop checks between windows, instead of raising
    # KeyboardInterrupt wherever the main thread happens to be (in the middle of printing a
    # window, or of onnxruntime): every counted window is printed, and the run ends promptly.
    stop = threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        summary = run_live(clf, source, int(round(window_ms * 1000)), on_window=on_window, on_drop=on_drop,
                           max_backlog=max_backlog, max_windows=max_windows, stop=stop)
    except LiveError as e:
        summary, error = getattr(e, "summary", None), str(e)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if summary is not None:
        d = summary.to_dict()
        if as_json:
            _emit({"summary": d})
        else:
            def ms(v):
                return "n/a" if v is None else f"{v:.2f} ms"

            rate = "" if not d["events_per_s"] else f" ({d['events_per_s'] / 1e6:.3g} Mev/s)"
            typer.echo(f"# {d['end']}: {d['windows']} windows, {d['events']:,} events{rate} in {d['active_s']:.1f} s; "
                       f"latency p50 {ms(d['latency_p50_ms'])}, p99 {ms(d['latency_p99_ms'])}; "
                       f"dropped {d['dropped_windows']} windows ({d['dropped_events']:,} events)"
                       + (f"; {d['outside_sensor']:,} events outside the model's sensor" if d["outside_sensor"] else ""))
    if error is not None:
        fail(error)
