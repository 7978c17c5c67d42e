"""Side environments: light virtualenvs that hold a framework tmkt cannot install beside itself
(lava-dl needs Python 3.10, sinabs pins an older nir), built once by a script in ``scripts/`` and
cached under ``~/.cache/tmkt``, and running a ``scripts/`` program there on ``.npz`` files.

The scripts ship with the source checkout, not with a wheel (``runtime/`` is installed as
``tmkt.runtime`` from the checkout, whose root is ``CHECKOUT_ROOT``): these checks need a checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

CHECKOUT_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path.home() / ".cache" / "tmkt"


def checkout_script(name: str, error: type[Exception], purpose: str) -> Path:
    """``scripts/<name>`` of the checkout, or `error` saying that `purpose` needs a checkout."""
    path = CHECKOUT_ROOT / "scripts" / name
    if not path.exists():
        raise error(f"{path} not found: {purpose} needs a tmkt source checkout")
    return path


def cached_python(env: Path, stamp: str, builder: str, builder_args: list[str], *, build: bool,
                  error: type[Exception], what: str) -> Path:
    """The Python of the env at `env`, built by ``bash scripts/<builder> <builder_args>`` when its
    `stamp` file is absent (and `build` is true); `error` names the env and how to build it."""
    py = env / "bin" / "python"
    if (env / stamp).exists() and py.exists():
        return py
    script = CHECKOUT_ROOT / "scripts" / builder
    if not build or not script.exists():
        raise error(f"no {what} environment at {env}; build it with: bash scripts/{builder} {' '.join(builder_args)}")
    proc = subprocess.run(["bash", str(script), *builder_args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise error(f"building the {what} environment failed:\n{proc.stderr[-2000:]}")
    return py


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s process group (it leads one: start_new_session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def run_npz(python: Path, script: Path, args: list[str], inputs: dict[str, np.ndarray], *, timeout: float,
            error: type[Exception], what: str, timeout_hint: str = "") -> tuple[dict[str, np.ndarray], float]:
    """Run ``python script *args in.npz out.npz`` with `inputs` in ``in.npz``; returns the arrays of
    ``out.npz`` and the subprocess's wall time. A non-zero exit raises `error` with the stderr tail;
    a run past `timeout` is killed with its process group and raises `error` (+ `timeout_hint`)."""
    with tempfile.TemporaryDirectory(prefix="tmkt-env-") as tmp:
        inp, outp = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, **inputs)
        start = time.perf_counter()
        # its own process group: lava starts a process per layer, and a timeout must end them all
        proc = subprocess.Popen([str(python), str(script), *args, str(inp), str(outp)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise error(f"{what} did not finish within {timeout:.0f} s and was stopped (with every process it "
                        f"started){timeout_hint}") from None
        except BaseException:  # Ctrl-C: leave nothing running
            _kill_group(proc)
            raise
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise error(f"{what} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
        with np.load(outp) as z:
            return {k: z[k] for k in z.files}, seconds
