"""Errors of a training run."""

from __future__ import annotations

from pathlib import Path

from tmkt.errors import TmktError


class TrainingError(TmktError, RuntimeError):
    """Training cannot go on (diverged loss, unusable data, mismatched resume)."""


class TrainingDataError(TrainingError, ValueError):
    """The data set cannot be built as configured (name, option, folder); the data package
    reports these as ValueError, which this class still is."""


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM once the resume state is on disk."""

    def __init__(self, run_dir: Path, epoch: int, step: int, signum: int) -> None:
        super().__init__(f"training interrupted at epoch {epoch + 1}, step {step}; resume with: tmkt train --resume {run_dir}")
        self.run_dir = run_dir
        self.epoch = epoch
        self.step = step
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
