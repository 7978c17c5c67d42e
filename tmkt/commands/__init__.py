"""CLI command groups; each module exposes `register(app)`."""

import logging
from typing import NoReturn

import typer

# spikingjelly registers its LIF op with torch.library.triton_op, and torch warns "Triton not
# available" on every CPU-only install: noise on stderr for the user, not a problem.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)


def fail(message: str, code: int = 1) -> NoReturn:
    """End a command with `error: <message>` on stderr and exit code `code` (no traceback).
    Plain text: paths in messages must not be wrapped or styled."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
