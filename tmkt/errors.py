"""The one base class of tmkt's expected errors.

Every error that reports a problem with the user's input, files or settings (a bad config key,
a run directory that does not load, an unreadable event file, a layer a target cannot take, an
export that fails its check) derives from `TmktError`. The CLI catches `TmktError` and prints
its message in one line; anything else is a bug and keeps its traceback. The concrete classes
keep their historic second base (`ValueError`, `RuntimeError`) so that callers catching those
still work.
"""

from __future__ import annotations


class TmktError(Exception):
    """An expected failure of tmkt whose message says what is wrong and where."""
