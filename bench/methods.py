"""Method comparison on the built-in digits pair: dvs / finetune / ekt / tmkt at several event fractions.

Every run is a full `tmkt.train.trainer.train` (best epoch chosen on the validation split, then
one test evaluation of those weights); the grid is methods x event fractions x seeds. Runs of
different fractions get the same number of optimiser steps (`--steps`), so that 3% of the
event data is not also 30x less training. Writes one JSON line per run to
``<runs-dir>/results.jsonl`` (kept as runs finish) and a markdown table (mean +- std of test
accuracy over seeds, validation accuracy, minutes per run) to ``--results``.

    python bench/methods.py                 # 4 methods x (3%, 10%, 30%) x 3 seeds
    python bench/methods.py --quick         # 4 methods x 10% x 1 seed, 40 steps: a smoke test
    python bench/methods.py --jobs 12 --device cuda --option noise_rate=5 --set mag_weight=0.5

The machine this was written on has 2 shared cores: each job uses one thread (several threads
per job only spin-wait under load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

METHOD_ORDER = ("dvs", "finetune", "ekt", "tmkt")


def _parse_kv(items: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE strings to a dict, values read as JSON when they parse (numbers, true/false)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{what} {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One settings dict per run (what `_run_one` takes), with epochs sized to `args.steps`."""
    from tmkt.data.registry import build_data

    runs = []
    root = Path(args.runs_dir)
    for fraction in args.fractions:
        # Builds (and caches) the emulated pool once here, before workers race for it.
        bundle = build_data(
            "digits", timesteps=args.timesteps, event_fraction=fraction, seed=args.seeds[0], options=args.options or None
        )
        n_train = len(bundle.train)
        per_epoch = math.ceil(n_train / args.batch_size)
        epochs = max(1, round(args.steps / per_epoch))
        for seed in args.seeds:
            for method in args.methods:
                cfg = {
                    "dataset": "digits",
                    "event_fraction": fraction,
                    "data_options": dict(args.options),
                    "timesteps": args.timesteps,
                    "backbone": "small",
                    "method": {"name": method, **args.set},
                    "epochs": epochs,
                    "batch_size": args.batch_size,
                    "lr": args.lr,
                    "warmup_epochs": round(0.05 * epochs, 3),
                    "eval_every": max(1, epochs // args.evals),
                    "seed": seed,
                    "device": args.device,
                    "amp": False,  # float32 everywhere, so CPU and GPU runs train the same model
                    "out": str(root / f"{method}-f{fraction:g}-s{seed}"),
                }
                runs.append({"config": cfg, "n_train": n_train, "steps": epochs * per_epoch, "threads": args.threads})
    return runs


def _run_one(run: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration in this (worker) process; returns its metrics and wall time."""
    import io

    import torch
    from rich.console import Console

    from tmkt.train.config import config_from_dict
    from tmkt.train.trainer import train

    torch.set_num_threads(run["threads"])
    cfg = config_from_dict(run["config"])
    t0 = time.perf_counter()
    result = train(cfg, console=Console(file=io.StringIO()))
    seconds = time.perf_counter() - t0
    c = run["config"]
    return {
        "method": c["method"]["name"],
        "fraction": c["event_fraction"],
        "seed": c["seed"],
        "n_train": run["n_train"],
        "steps": run["steps"],
        "epochs": c["epochs"],
        "test_accuracy": result.metrics["test_accuracy"],
        "val_accuracy": result.metrics["best_val_accuracy"],
        "best_epoch": result.metrics["best_epoch"],
        "seconds": round(seconds, 2),
        "run_dir": c["out"],
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, wall: float) -> str:
    """The results section: settings, the exact command, test / val tables and minutes per run."""
    fractions = sorted({r["fraction"] for r in rows})
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]

    def cell(method: str, fraction: float, key: str) -> str:
        return _mean_std([r[key] for r in rows if r["method"] == method and r["fraction"] == fraction])

    def n_train(fraction: float) -> int:
        return next(r["n_train"] for r in rows if r["fraction"] == fraction)

    lo, hi = min(r["steps"] for r in rows), max(r["steps"] for r in rows)
    steps = f"{lo}" if lo == hi else f"{lo}-{hi}"
    seeds = ", ".join(str(v) for v in sorted({r["seed"] for r in rows}))
    head = "| method | " + " | ".join(f"{100 * f:g}% ({n_train(f)} ev.)" for f in fractions) + " | min / run |"
    rule = "|---" * (len(fractions) + 2) + "|"
    lines = [
        f"## {args.title}",
        "",
        f"Command: `{command}`",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node() or 'host'} "
        f"({os.cpu_count()} CPUs, device `{args.device}`, {args.jobs} jobs x {args.threads} thread(s)); "
        f"T={args.timesteps}, small backbone 32x32, batch {args.batch_size}, lr {args.lr:g}, {steps} "
        f"optimiser steps per run, seeds {seeds}; data options {args.options or '{}'}; "
        f"method overrides {args.set or '{}'}; {len(rows)} runs in {wall / 60:.1f} min.",
        "",
        "Test accuracy (%), mean ± std over seeds, of the best-validation epoch:",
        "",
        head,
        rule,
    ]
    for m in methods:
        minutes = statistics.fmean(r["seconds"] for r in rows if r["method"] == m) / 60
        lines.append(f"| {m} | " + " | ".join(cell(m, f, "test_accuracy") for f in fractions) + f" | {minutes:.2f} |")
    lines += ["", "Best validation accuracy (%), the number the epoch was chosen on:", "", head.replace(" min / run |", ""), "|---" * (len(fractions) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(m, f, "val_accuracy") for f in fractions) + " |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated subset of dvs,finetune,ekt,tmkt")
    p.add_argument("--fractions", default="0.03,0.1,0.3", help="event-data fractions of the training pool")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per run (epochs are sized to it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--timesteps", type=int, default=6)
    p.add_argument("--evals", type=int, default=10, help="validations per run (best epoch is chosen on them)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--option", "-o", action="append", default=[], help="digits data option KEY=VALUE (repeatable)")
    p.add_argument("--set", action="append", default=[], help="MethodConfig field KEY=VALUE for every method")
    p.add_argument("--runs-dir", default="runs/bench-methods")
    p.add_argument("--results", default="docs/results-methods.md", help="markdown file the section goes to")
    p.add_argument("--append", action="store_true", help="append the section instead of replacing the file")
    p.add_argument("--title", default="Method comparison on digits")
    p.add_argument("--quick", action="store_true", help="smoke test: 10%% only, seed 0, 40 steps")
    p.add_argument("--from-log", default=None, help="train nothing: tabulate this results.jsonl (e.g. a cut-short grid)")
    args = p.parse_args(argv)
    if args.quick:
        args.fractions, args.seeds, args.steps, args.evals = "0.1", "0", 40, 4
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHOD_ORDER]
    if bad:
        p.error(f"unknown methods {bad}")
    args.fractions = _floats(args.fractions)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.options = _parse_kv(args.option, "--option")
    args.set = _parse_kv(args.set, "--set")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python bench/methods.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.from_log:
        rows = [json.loads(line) for line in Path(args.from_log).read_text().splitlines() if line.strip()]
        _write(markdown(rows, args, command, sum(r["seconds"] for r in rows) / max(1, args.jobs)), args)
        return
    runs = plan_runs(args)
    root = Path(args.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "results.jsonl"
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    print(f"{len(runs)} runs, {args.jobs} at a time; results -> {log}", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_one, r) for r in runs]
        for fut in as_completed(futures):
            row = fut.result()
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"[{len(rows)}/{len(runs)}] {row['method']:8s} f={row['fraction']:<5g} seed={row['seed']} "
                f"test {row['test_accuracy']:.3f} val {row['val_accuracy']:.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    _write(markdown(rows, args, command, time.perf_counter() - t0), args)


def _write(section: str, args: argparse.Namespace) -> None:
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + section)
    else:
        out.write_text("# Method comparison\n\n" + section)
    print(section)


if __name__ == "__main__":
    main()
