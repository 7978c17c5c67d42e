"""`tmkt data ...`: inspect recordings and emulate event cameras."""

from __future__ import annotations

import typer

from tmkt.commands import fail

data_app = typer.Typer(help="Inspect event recordings and emulate a DVS over image folders.", no_args_is_help=True)


MAX_EXPANSION_HELP = (
    "Refuse a compressed .npz/.h5 whose arrays declare more than this many times the bytes it stores "
    "(a decompression bomb); raise it for a genuine, extremely compressible file."
)


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=summary["path"], show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    w, h, _ = summary["sensor_size"]
    on_fraction = summary["on_fraction"]
    rows = [
        ("events", f"{summary['events']:,}"),
        ("sensor (W x H)", f"{w} x {h}"),
        ("duration", f"{summary['duration_s']:.6f} s"),
        ("rate", f"{summary['rate_ev_s']:,.1f} ev/s"),
        ("t first / last", f"{summary['t_first_us']} / {summary['t_last_us']} us"),
        ("ON / OFF", f"{summary['on_events']:,} / {summary['off_events']:,}"),
        ("ON fraction", "-" if on_fraction is None else f"{on_fraction:.3f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


@data_app.command("info")
def info(
    paths: list[str] = typer.Argument(..., help="Event files: .bin .aedat4 .npy .npz .h5 .raw .dat"),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary as JSON (a list of summaries when several files are given)."
    ),
    max_expansion: float = typer.Option(100.0, "--max-expansion", min=1.0, help=MAX_EXPANSION_HELP),
) -> None:
    """Summarize event recordings: events, duration, rate, sensor size, ON/OFF balance.

    Files are read a chunk at a time (memory does not grow with their length). A file that
    cannot be read is reported on its own line (error: FILE: fault) and the others are still
    summarized; the exit code is then 1."""
    import json
    import warnings

    from tmkt.data.events import ReadLimits, scan_events
    from tmkt.errors import TmktError

    from pathlib import Path

    limits = ReadLimits(max_expansion=max_expansion)
    summaries, failed = [], 0
    for path in paths:
        try:
            if Path(path).is_dir():
                raise IsADirectoryError(f"{path} is a folder; give event files")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                summary = scan_events(path, limits=limits)
            for w in caught:
                typer.echo(f"warning: {w.message}", err=True)
        except (TmktError, IsADirectoryError) as exc:
            typer.echo(f"error: {exc}", err=True)
            failed += 1
            continue
        summaries.append(summary)
        if not as_json:
            _print_table(summary)
    if as_json and summaries:
        typer.echo(json.dumps(summaries[0] if len(paths) == 1 else summaries, indent=2))
    elif as_json and len(paths) > 1:
        typer.echo("[]")
    if failed:
        raise typer.Exit(code=1)


@data_app.command("emulate")
def emulate(
    images_dir: str = typer.Argument(..., help="Folder of images (class sub-folders are kept)."),
    out_dir: str = typer.Argument(..., help="Where the event files are written."),
    fmt: str = typer.Option("npz", "--format", help="Event file format: bin, npz, h5 or npy."),
    seed: int = typer.Option(0, "--seed", help="Seeds threshold mismatch and noise."),
    threshold: float = typer.Option(0.25, "--threshold", help="Contrast threshold (log intensity)."),
    noise_rate: float = typer.Option(0.5, "--noise-rate", help="Background events per pixel per second."),
    amplitude: float = typer.Option(2.0, "--amplitude", help="Saccade amplitude in pixels."),
    padding: int = typer.Option(2, "--padding", help="Black border around the image, in pixels."),
    fit: str = typer.Option("", "--fit", help="Shrink images to fit a WxH sensor, e.g. 240x180."),
) -> None:
    """Record every image with an emulated DVS making three saccades (as N-MNIST/N-Caltech101)."""
    from rich.console import Console
    from rich.progress import Progress

    from tmkt.data.emulate_folder import FORMATS, emulate_folder, list_images
    from tmkt.data.emulator import EmulatorConfig

    if fmt not in FORMATS:
        raise typer.BadParameter(f"choose one of {', '.join(FORMATS)}", param_hint="--format")
    fit_size = None
    if fit:
        try:
            w, h = (int(v) for v in fit.lower().split("x"))
            fit_size = (w, h)
        except ValueError:
            raise typer.BadParameter(f"{fit!r} is not WxH, e.g. 240x180", param_hint="--fit") from None
    try:
        config = EmulatorConfig(
            threshold=threshold, noise_rate=noise_rate, saccade_amplitude=amplitude, padding=padding, seed=seed
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    from pathlib import Path

    if not Path(images_dir).is_dir():
        raise typer.BadParameter(f"{images_dir}: no such folder", param_hint="IMAGES_DIR")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise typer.BadParameter(f"{out_dir} is a file, not a folder", param_hint="OUT_DIR")
    n = len(list_images(images_dir))
    if n == 0:
        fail(f"no images under {images_dir}")
    with Progress(transient=True) as progress:
        task = progress.add_task("emulating", total=n)
        try:
            summary = emulate_folder(
                images_dir, out_dir, fmt=fmt, config=config, fit=fit_size, on_file=lambda _: progress.advance(task)
            )
        except ValueError as exc:
            fail(str(exc))
    console = Console()
    console.print(
        f"{summary['written']}/{summary['files']} images -> {out_dir} ({fmt}), "
        f"{summary['events']:,} events, {summary['events_per_file']:,.0f} per file, "
        f"{len(summary['classes'])} classes"
    )
    for line in summary["failed"]:
        console.print(f"[red]failed[/red] {line}")
    if summary["failed"]:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
