"""The `tmkt` command line: maps command names to typed functions that call library code.

Each command group lives in `tmkt/commands/<name>.py` and exposes `register(app)`.
Heavy imports (torch, onnxruntime, h5py) happen inside the command functions so that
`tmkt --help` stays fast.
"""

from __future__ import annotations

import typer

from tmkt import __version__

app = typer.Typer(
    name="tmkt",
    help=(
        "Train spiking networks on event-camera data with Time-step Mixup Knowledge Transfer "
        "(TMKT), then export them to ONNX, Loihi (lava-dl netx) and NIR, profile their energy "
        "and run them on event streams."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tmkt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """tmkt: from event data to the edge with spiking networks."""


# Command groups register themselves here, one line each.
from tmkt.commands import data as _data  # noqa: E402
from tmkt.commands import export as _export  # noqa: E402
from tmkt.commands import infer as _infer  # noqa: E402
from tmkt.commands import profile as _profile  # noqa: E402
from tmkt.commands import train as _train  # noqa: E402

_data.register(app)
_train.register(app)
_export.register(app)
_infer.register(app)
_profile.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
