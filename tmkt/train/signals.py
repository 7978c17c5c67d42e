"""Ctrl-C and SIGTERM during training: the first signal asks the loop to stop after the current
step (the trainer then saves and raises `TrainingInterrupted`), a second one aborts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopFlag:
    """SIGINT / SIGTERM handler: the first signal asks to stop after the current step, the
    second raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum, _frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0


@contextmanager
def catch_stop_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals are only delivered to the main thread; nothing to install
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, flag)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
