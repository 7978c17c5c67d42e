"""`tmkt data ...`: inspect recordings and emulate event cameras."""

from __future__ import annotations

import typer

data_app = typer.Typer(help="Inspect event recordings and emulate a DVS over image folders.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
