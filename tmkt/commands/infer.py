"""`tmkt infer MODEL.onnx EVENTS...`: classify event recordings with an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tmkt.commands import fail


def _event_files(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to their event files (recursively, sorted)."""
    from tmkt.data.events import READ_SUFFIXES

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in READ_SUFFIXES)
            if not found:
                raise typer.BadParameter(f"{p}: folder holds no event files ({' '.join(READ_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    return out


def _windows(path: Path, window_us: int, limits, max_windows: int):
    """The windows of `split_windows` on the file's events, read a chunk at a time: a first pass
    finds the span (the window count is checked against `max_windows` before any is classified)
    and whether time goes back; a file whose timestamps go back is read whole and sorted."""
    from tmkt.data.binning import check_window_count
    from tmkt.data.events import open_events, read_events, time_windows
    from tmkt.runtime.classifier import split_windows

    scan = open_events(path, limits=limits)
    for _ in scan.chunks():
        pass
    if not scan.sorted:
        return split_windows(read_events(path, limits=limits).events, window_us, max_windows=max_windows)
    if scan.count == 0:
        return []
    check_window_count(scan.t_min, scan.t_max, window_us, max_windows)
    return time_windows(open_events(path, limits=limits).chunks(), window_us, str(path))


def infer(
    model: Path = typer.Argument(..., help="ONNX model written by `tmkt export` (unrolled or stream)."),
    events: Optional[list[Path]] = typer.Argument(
        None, help="Event files (.bin .aedat4 .npy .npz .h5 .raw .dat) or folders (none with --live/--follow/--camera)."
    ),
    window_ms: Optional[float] = typer.Option(
        None,
        "--window-ms",
        help="Slice each recording into consecutive windows of this length; each window is binned into T "
        "frames (as training binned a sample) and classified.",
    ),
    state: Optional[str] = typer.Option(
        None,
        "--state",
        help="With --window-ms: 'carry' runs LIF membranes on from window to window (stream model, the "
        "default for one) or 'reset' classifies each window on its own (the default for unrolled models).",
    ),
    provider: str = typer.Option("auto", "--provider", help="auto (CUDA if usable, else CPU) | cuda | cpu."),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON instead of a table (live: one JSON object per line, then the summary)."
    ),
    live: Optional[str] = typer.Option(
        None, "--live", help="Classify a DV network stream as it arrives: tcp://HOST:PORT (iniVation DV, dv-processing)."
    ),
    follow: Optional[Path] = typer.Option(
        None, "--follow", help="Classify a file still being written, like tail -f: Prophesee .raw (EVT2/3) or t,x,y,p .csv/.txt."
    ),
    camera: bool = typer.Option(False, "--camera", help="Classify an attached iniVation camera (dv-processing; untested here)."),
    camera_serial: Optional[str] = typer.Option(None, "--camera-serial", help="With --camera: the camera's serial number."),
    idle_timeout: Optional[float] = typer.Option(
        None, "--idle-timeout", min=0, help="With --follow: stop when the file has not grown for this many seconds."
    ),
    connect_timeout: float = typer.Option(5.0, "--connect-timeout", min=0.1, help="With --live: seconds to wait for the stream."),
    max_backlog: int = typer.Option(
        8, "--max-backlog", min=1, help="Live: drop (and report) the oldest windows when more than this many wait."
    ),
    max_windows: int = typer.Option(
        100_000, "--max-windows", min=1,
        help="With --window-ms: refuse a recording that would give more windows than this (a file is "
        "reported, the others go on); live: refuse a time jump of more windows than this.",
    ),
    max_expansion: float = typer.Option(
        100.0, "--max-expansion", min=1.0,
        help="Refuse a compressed .npz/.h5 whose arrays declare more than this many times the bytes it "
        "stores (a decompression bomb); raise it for a genuine, extremely compressible file.",
    ),
) -> None:
    """Predict the class of each recording (or each window) with onnxruntime, with latency; or of each
    window of a live stream (--live, --follow, --camera) with the stream model's state carried on.
    Ctrl-C ends a live run with its summary.

    With --window-ms a file is read a chunk at a time (memory does not grow with its length); a
    file whose timestamps go back is read whole and sorted. A file that cannot be read or
    classified is reported on its own line and the others go on; the exit code is then 1."""
    import json
    import warnings as py_warnings

    from tmkt.data.events import ReadLimits, read_events
    from tmkt.errors import TmktError
    from tmkt.runtime.classifier import PROVIDERS, EventClassifier

    if provider not in PROVIDERS:
        raise typer.BadParameter(f"must be one of {', '.join(PROVIDERS)}", param_hint="--provider")
    if window_ms is not None and window_ms * 1000 < 1:  # event times are integer microseconds
        raise typer.BadParameter(f"must be at least 0.001 (1 µs), got {window_ms:g}", param_hint="--window-ms")
    if state not in (None, "carry", "reset"):
        raise typer.BadParameter("must be carry or reset", param_hint="--state")
    if state is not None and window_ms is None:
        raise typer.BadParameter("--state applies with --window-ms only", param_hint="--state")
    if not model.is_file():
        fail(f"{model}: no such model file")
    sources = [name for name, on in (("--live", live is not None), ("--follow", follow is not None), ("--camera", camera)) if on]
    if len(sources) > 1:
        raise typer.BadParameter(f"give one live source, not {' and '.join(sources)}", param_hint=sources[1])
    if sources:
        if events:
            raise typer.BadParameter(f"{sources[0]} takes no event files", param_hint="EVENTS")
        if state == "reset":
            raise typer.BadParameter("live streams carry the state from window to window", param_hint="--state")
        from tmkt.commands.live import run_live_command

        run_live_command(model, provider, window_ms, as_json, live=live, follow=follow, camera=camera,
                         camera_serial=camera_serial, idle_timeout=idle_timeout, connect_timeout=connect_timeout,
                         max_backlog=max_backlog, max_windows=max_windows)
        return
    if not events:
        raise typer.BadParameter("give event files or folders, or a live source (--live, --follow, --camera)",
                                 param_hint="EVENTS")
    files = _event_files(events)
    hint = "" if model.suffix.lower() == ".onnx" else " (infer takes the .onnx file of `tmkt export --target onnx`)"
    try:
        clf = EventClassifier(model, provider=provider)
    except TmktError as e:
        fail(f"{e}{hint}")
    except Exception as e:  # onnxruntime's own errors on a graph that passed the checks
        first = (str(e).strip().splitlines() or [""])[0][:300]
        fail(f"{model}: onnxruntime cannot load the model ({type(e).__name__}: {first}){hint}")
    limits = ReadLimits(max_expansion=max_expansion)
    carry = (state or ("carry" if clf.mode == "stream" else "reset")) == "carry"
    if carry and clf.mode != "stream":
        raise typer.BadParameter(
            f"{model.name} is an unrolled model: carrying state needs `tmkt export --mode stream`; or use --state reset",
            param_hint="--state",
        )

    rows: list[dict] = []
    errors: list[dict] = []
    warned: list[dict] = []
    for f in files:
        try:
            with py_warnings.catch_warnings(record=True) as caught:
                py_warnings.simplefilter("always")
                if window_ms is None:
                    preds = [clf.predict(read_events(f, limits=limits).events)]
                else:
                    windows = _windows(f, int(round(window_ms * 1000)), limits, max_windows)
                    preds = list(clf.stream(windows, carry_state=carry))
            for w in caught:
                msg = str(w.message) if str(w.message).startswith(str(f)) else f"{f}: {w.message}"
                warned.append({"file": str(f), "warning": msg})
                if not as_json:
                    typer.echo(f"warning: {msg}", err=True)
        except (TmktError, MemoryError) as e:
            if isinstance(e, MemoryError):
                e = TmktError("out of memory (try --window-ms, which reads the file a chunk at a time)")
            msg = str(e) if str(e).startswith(str(f)) else f"{f}: {e}"  # binning and windows do not know the file
            errors.append({"file": str(f), "error": msg})
            if not as_json:
                typer.echo(f"error: {msg}", err=True)
            continue
        if not preds and not as_json:
            typer.echo(f"note: {f}: no events, so no windows to classify", err=True)
        for k, p in enumerate(preds):
            rows.append({"file": str(f), "window": k if window_ms is not None else None, **p.to_dict()})

    if as_json:
        doc = {
            "model": str(model),
            "mode": clf.mode,
            "provider": clf.provider,
            "window_ms": window_ms,
            "state": ("carry" if carry else "reset") if window_ms is not None else None,
            "class_names": clf.class_names,
            "predictions": rows,
            "errors": errors,
            "warnings": warned,
        }
        typer.echo(json.dumps(doc, indent=2))
    elif rows:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{model.name} ({clf.mode}, T={clf.timesteps}) on {clf.provider}")
        table.add_column("file")
        if window_ms is not None:
            table.add_column("window", justify="right")
        for col in ("events", "class", "score", "latency ms"):
            table.add_column(col, justify="right" if col != "class" else "left")
        for r in rows:
            cells = [Path(r["file"]).name]
            if window_ms is not None:
                t = r["t_range_us"]
                cells.append(f"{r['window']}" + ("" if t is None else f" ({t[0]}..{t[1]} us)"))
            cells += [f"{r['events']:,}", r["label"], f"{r['score']:.3f}", f"{r['latency_ms']:.2f}"]
            table.add_row(*cells)
        Console(width=160).print(table)
    if errors:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("infer")(infer)
