"""bench/methods.py: the grid plan (per-class amounts, variants) and the tables and plot it writes
from a results log, checked against numbers computed here."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import methods  # noqa: E402


def test_tables_and_plot_from_a_results_log(tmp_path):
    rows = []
    for seed, (a, b) in enumerate([(0.70, 0.80), (0.74, 0.90), (0.78, 0.85)]):
        for variant, acc in (("dvs", a), ("ekt-shared", b)):
            rows.append({"set": "mnist", "variant": variant, "amount": "2/class", "per_class": [2] * 10,
                         "method": variant.split("-")[0], "fraction": 0.0133, "seed": seed, "n_train": 20,
                         "steps": 100, "epochs": 100, "test_accuracy": acc, "val_accuracy": acc - 0.01,
                         "best_epoch": 3, "seconds": 60.0, "run_dir": f"x/{variant}-{seed}"})
    log = tmp_path / "results.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, png = tmp_path / "r.md", tmp_path / "p.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "methods.py"), "--from-log", str(log),
                           "--results", str(md), "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = md.read_text()
    for variant, accs in (("dvs", [0.70, 0.74, 0.78]), ("ekt-shared", [0.80, 0.90, 0.85])):
        cell = f"{100 * statistics.fmean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}"
        assert f"| {variant} | {cell} | 1.00 |" in text
    assert "### mnist" in text and "2/class (20 ev.)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_turns_per_class_counts_into_exact_per_class_subsets(tmp_path):
    args = methods.parse_args(["--sets", "digits", "--per-class", "2,5", "--seeds", "0", "--variants", "dvs,tmkt-paper",
                               "--runs-dir", str(tmp_path), "-o", "saccade_duration_us=20000",
                               "-o", "time_resolution_us=10000"])
    runs = methods.plan_runs(args)
    assert [(r["variant"], r["amount"]) for r in runs] == [
        ("dvs", "2/class"), ("tmkt-paper", "2/class"), ("dvs", "5/class"), ("tmkt-paper", "5/class")]
    for r in runs:
        n = int(r["amount"].split("/")[0])
        assert r["per_class"] == [n] * 10 and r["n_train"] == 10 * n
    paper = runs[1]["config"]["method"]
    assert paper["name"] == "tmkt" and paper["source_head"] == "mixed" and paper["bn_stats"] == "both"


def test_a_failing_run_is_reported_and_the_grid_goes_on(tmp_path, capsys):
    # An unknown MethodConfig field makes every run fail inside its worker: each failure is
    # printed with its run directory as it happens, nothing is logged as a result, and the
    # bench exits non-zero naming the runs (it used to sit silently until the pool drained).
    runs_dir = tmp_path / "runs"
    argv = ["--sets", "digits", "--per-class", "2", "--seeds", "0", "--steps", "1", "--evals", "1",
            "--variants", "dvs,ekt-shared", "--set", "no_such_field=1", "--runs-dir", str(runs_dir),
            "--results", str(tmp_path / "r.md"), "--plot", "", "--jobs", "1"]
    try:
        methods.main(argv)
    except SystemExit as e:
        message = str(e.code)
    else:
        raise AssertionError("a grid whose runs all failed exited 0")
    assert message.startswith("2 of 2 runs failed")
    assert "dvs-2class-s0" in message and "ekt-shared-2class-s0" in message
    out = capsys.readouterr().out
    assert out.count("FAILED ") == 2 and "no_such_field" in out
    log = runs_dir / "results.jsonl"
    assert not log.exists() or not log.read_text().strip()
