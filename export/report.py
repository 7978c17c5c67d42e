"""What every exporter returns, and the errors every exporter raises.

One shape for every exit: `export_<target>(graph, path, *, verify=True, ...) -> ExportReport`.
The file is written to a temporary path, checked there, and renamed onto `path` only when every
check passed, so a failed check leaves no file behind (`tmkt.fileio.atomic_path`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmkt.errors import TmktError


class ExportError(TmktError, ValueError):
    """An export that cannot be written as asked (bad option, a model over a format's limit)."""


class ExportVerificationError(TmktError, RuntimeError):
    """A written file disagrees with the model it came from; it was not moved into place.
    `.figures` holds the numbers of the failed check."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = dict(figures or {})


@dataclass(frozen=True)
class ExportReport:
    """One export: what was written, what was checked, the figures.

    target: the format ("onnx", "netx", "nir").
    path: the file written.
    written: what the file holds, in words (e.g. "unrolled, T=8, 41.2 KiB").
    checks: check name -> its outcome in words, in the order the checks ran; a check that was
        skipped says so ("skipped").
    figures: the numbers behind the checks (JSON-ready), e.g. max_abs_logit_diff.
    """

    target: str
    path: Path
    written: str
    checks: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """`wrote PATH (written)` and one line per check."""
        lines = [f"wrote {self.path}" + (f" ({self.written})" if self.written else "")]
        lines += [f"{name}: {outcome}" for name, outcome in self.checks.items()]
        return "\n".join(lines)
