"""bench/train_step.py runs end to end (tiny shapes on the CPU) and writes its JSON; the compiled
TMKT variant (AOTAutograd without code generation) starts from the eager variant's loss."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_bench_smoke(tmp_path):
    out = tmp_path / "ts.json"
    variants = "loop-bf16,loop-bf16-compile,sj-ce-fp32,tmkt-fp32,tmkt-bf16,tmkt-bf16-compile"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--small", "--steps", "2", "--rounds", "1",
         "--warmup", "1", "--only", variants, "--compile-backend", "aot_eager", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == variants.split(",")
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["ms_per_step"] > 0 and row["first_loss"] > 0
    # On a CPU there is no autocast in the trainer's step, so every TMKT variant computes the same
    # first step from the same weights and draws.
    assert rows["tmkt-bf16-compile"]["first_loss"] == rows["tmkt-bf16"]["first_loss"] == rows["tmkt-fp32"]["first_loss"]
    assert "speed-up against loop-bf16" in proc.stdout
