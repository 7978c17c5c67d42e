"""`tmkt infer MODEL.onnx EVENTS...`: classify event recordings with an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


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


def infer(
    model: Path = typer.Argument(..., help="ONNX model written by `tmkt export` (unrolled or stream)."),
    events: list[Path] = typer.Argument(..., help="Event files (.bin .aedat4 .npy .npz .h5 .raw .dat) or folders."),
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
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Predict the class of each recording (or each window) with onnxruntime, with latency."""
    import json

    from tmkt.data.events import EventFileError, read_events
    from tmkt.export.metadata import MetadataError
    from tmkt.runtime.classifier import PROVIDERS, EventClassifier, InferenceError, split_windows

    if provider not in PROVIDERS:
        raise typer.BadParameter(f"must be one of {', '.join(PROVIDERS)}", param_hint="--provider")
    if window_ms is not None and window_ms <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--window-ms")
    if state not in (None, "carry", "reset"):
        raise typer.BadParameter("must be carry or reset", param_hint="--state")
    if state is not None and window_ms is None:
        raise typer.BadParameter("--state applies with --window-ms only", param_hint="--state")
    if not model.is_file():
        typer.echo(f"error: {model}: no such model file", err=True)
        raise typer.Exit(code=1)
    files = _event_files(events)
    try:
        clf = EventClassifier(model, provider=provider)
    except (MetadataError, InferenceError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    carry = (state or ("carry" if clf.mode == "stream" else "reset")) == "carry"

    rows: list[dict] = []
    errors: list[dict] = []
    for f in files:
        try:
            rec = read_events(f)
            if window_ms is None:
                preds = [clf.predict(rec.events)]
            else:
                windows = split_windows(rec.events, int(round(window_ms * 1000)))
                preds = list(clf.stream(windows, carry_state=carry))
        except (EventFileError, InferenceError) as e:
            errors.append({"file": str(f), "error": str(e)})
            if not as_json:
                typer.echo(f"error: {e}", err=True)
            continue
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
