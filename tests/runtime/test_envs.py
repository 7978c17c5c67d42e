"""Side-environment runs (lava-dl, NIR frameworks): a run that outlives its timeout is stopped
with every process it started, and says so in the caller's error."""

import os
import sys
import time

import numpy as np
import pytest

from tmkt.runtime.envs import run_npz


class SideError(Exception):
    pass


SCRIPT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone for our purpose
        return f.read().split(") ")[-1][0] != "Z"


def test_timeout_stops_the_run_and_its_children(tmp_path):
    script, pid_file = tmp_path / "hang.py", tmp_path / "child.pid"
    script.write_text(SCRIPT)
    start = time.perf_counter()
    with pytest.raises(SideError, match="did not finish within 3 s and was stopped .*; use fewer samples"):
        run_npz(sys.executable, script, [str(pid_file)], {"x": np.zeros(1)}, timeout=3, error=SideError, what="hang run",
                timeout_hint="; use fewer samples")
    assert time.perf_counter() - start < 30
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_a_failing_run_names_its_stderr(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys; sys.stderr.write('broken on purpose'); sys.exit(3)")
    with pytest.raises(SideError, match="(?s)fail run failed \\(exit 3\\).*broken on purpose"):
        run_npz(sys.executable, script, [], {"x": np.zeros(1)}, timeout=30, error=SideError, what="fail run")
