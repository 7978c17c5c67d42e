"""Method comparison on the built-in pairs: events-only, fine-tuning, EKT and TMKT with few labelled event recordings.

Every run is a full `tmkt.train.trainer.train` (best epoch chosen on the validation split, then
one test evaluation of those weights); the grid is sets x variants x amounts of event data x
seeds. A *variant* is a method with settings (`VARIANTS`: the papers' designs, the shared-head
configurations, the default). Amounts are labelled event recordings per class (`--per-class`)
or shares of the event training pool (`--fractions`). Runs of every amount get the same number
of optimiser steps (`--steps`), so that less event data is not also less training. Writes one
JSON line per run to ``<runs-dir>/results.jsonl`` (kept as runs finish; a rerun skips the runs
already there), a markdown table (mean +- std of test accuracy over seeds, validation accuracy,
minutes per run) to ``--results`` and a plot of test accuracy against event data to ``--plot``.

    python bench/methods.py                 # both sets, the main variants, 2/5/15 per class, 5 seeds
    python bench/methods.py --quick         # digits, 4 variants x 5 per class x 1 seed, 40 steps: a smoke test
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
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tmkt.train.method import METHOD_PRESETS  # noqa: E402

METHOD_ORDER = ("dvs", "finetune", "ekt", "tmkt")
# Named configurations: a method and its MethodConfig overrides. `*-paper` is the papers' design
# (a separate classifier for the static / mixed stream, BatchNorm statistics from both streams as
# in EKT's code; `tmkt-paper` is `tmkt train --preset paper`), `*-shared` sends that stream through the
# event classifier, `tmkt-shared-progress` also ramps TMKT's mix ratio with training progress.
VARIANTS: dict[str, dict[str, Any]] = {
    "dvs": {"name": "dvs"},
    "finetune": {"name": "finetune"},
    "ekt-paper": {"name": "ekt", "source_head": "mixed", "bn_stats": "both"},
    "tmkt-paper": METHOD_PRESETS["paper"],
    "ekt-shared": {"name": "ekt", "source_head": "event"},
    "tmkt-shared": {"name": "tmkt", "source_head": "event"},
    "tmkt-shared-progress": {"name": "tmkt", "source_head": "event", "mix_ratio_schedule": "progress"},
}
MAIN_VARIANTS = tuple(VARIANTS)
SETS = ("digits", "mnist")
DEFAULT_VARIANT = "ekt-shared"  # what `tmkt train` uses by default (plotted as a solid line)


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


def _amounts(args: argparse.Namespace, train_labels) -> list[tuple[str, float]]:
    """(label, event_fraction) pairs: per-class counts become the fraction that keeps that many
    recordings of a class of median size (`stratified_fraction` rounds per class)."""
    import numpy as np

    if args.per_class:
        median = float(np.median(np.bincount(np.asarray(train_labels))))
        return [(f"{n}/class", min(1.0, n / median)) for n in args.per_class]
    return [(f"{100 * f:g}%", f) for f in args.fractions]


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One settings dict per run (what `_run_one` takes), with epochs sized to `args.steps`.

    Ordered amount-first, so the scarce amounts (what the default is chosen on) finish first."""
    import numpy as np

    from tmkt.data.registry import build_data

    runs = []
    root = Path(args.runs_dir)
    for dataset in args.sets:
        # Builds (and caches) the emulated pool here, before workers race for it.
        full = build_data(dataset, timesteps=args.timesteps, seed=args.seeds[0], options=args.options or None)
        for amount, fraction in _amounts(args, full.train.labels):
            bundle = build_data(
                dataset, timesteps=args.timesteps, event_fraction=fraction, seed=args.seeds[0], options=args.options or None
            )
            n_train = len(bundle.train)
            per_class = np.bincount(bundle.train.labels).tolist()
            per_epoch = math.ceil(n_train / args.batch_size)
            epochs = max(1, round(args.steps / per_epoch))
            for seed in args.seeds:
                for variant in args.variants:
                    cfg = {
                        "dataset": dataset,
                        "event_fraction": fraction,
                        "data_options": dict(args.options),
                        "timesteps": args.timesteps,
                        "input_size": [32, 32],
                        "backbone": "small",
                        "method": {**VARIANTS[variant], **args.set},
                        "epochs": epochs,
                        "batch_size": args.batch_size,
                        "lr": args.lr,
                        "warmup_epochs": round(0.05 * epochs, 3),
                        "eval_every": max(1, epochs // args.evals),
                        "seed": seed,
                        "device": args.device,
                        "amp": False,  # float32 everywhere, so CPU and GPU runs train the same model
                        "out": str(root / dataset / f"{variant}-{amount.replace('/', '')}-s{seed}"),
                    }
                    runs.append({
                        "config": cfg, "variant": variant, "amount": amount, "n_train": n_train,
                        "per_class": per_class, "steps": epochs * per_epoch, "threads": args.threads,
                    })
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
    # A run directory that is not in results.jsonl is an interrupted run of this bench: retrain it.
    result = train(cfg, console=Console(file=io.StringIO()), overwrite=True)
    seconds = time.perf_counter() - t0
    c = run["config"]
    return {
        "set": c["dataset"],
        "variant": run["variant"],
        "amount": run["amount"],
        "per_class": run["per_class"],
        "method": c["method"]["name"],
        "method_config": c["method"],
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


def _amount_key(amount: str) -> float:
    return float(amount.split("/")[0].rstrip("%"))


def _ordered(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """Sets, variants and amounts present in `rows`, in a stable reading order."""
    sets = [d for d in SETS if any(r["set"] == d for r in rows)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    amounts = sorted({r["amount"] for r in rows}, key=_amount_key)
    return sets, variants, amounts


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, wall: float) -> str:
    """The results section: settings, the exact command, and per set test / val tables and minutes per run."""
    sets, variants, amounts = _ordered(rows)
    lo, hi = min(r["steps"] for r in rows), max(r["steps"] for r in rows)
    steps = f"{lo}" if lo == hi else f"{lo}-{hi}"
    seeds = ", ".join(str(v) for v in sorted({r["seed"] for r in rows}))
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
    ]
    for dataset in sets:
        mine = [r for r in rows if r["set"] == dataset]

        def cell(variant: str, amount: str, key: str) -> str:
            return _mean_std([r[key] for r in mine if r["variant"] == variant and r["amount"] == amount])

        def n_train(amount: str) -> str:
            found = [r["n_train"] for r in mine if r["amount"] == amount]
            return f"{amount} ({found[0]} ev.)" if found else amount

        head = "| variant | " + " | ".join(n_train(a) for a in amounts) + " | min / run |"
        lines += [f"### {dataset}", "", "Test accuracy (%), mean ± std over seeds, of the best-validation epoch:", "", head,
                  "|---" * (len(amounts) + 2) + "|"]
        for v in variants:
            times = [r["seconds"] for r in mine if r["variant"] == v]
            if times:
                lines.append(f"| {v} | " + " | ".join(cell(v, a, "test_accuracy") for a in amounts)
                             + f" | {statistics.fmean(times) / 60:.2f} |")
        lines += ["", "Best validation accuracy (%), the number the epoch and the default were chosen on:", "",
                  head.replace(" min / run |", ""), "|---" * (len(amounts) + 1) + "|"]
        for v in variants:
            if any(r["variant"] == v for r in mine):
                lines.append(f"| {v} | " + " | ".join(cell(v, a, "val_accuracy") for a in amounts) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Test accuracy (mean ± std over seeds) against labelled event recordings per class, one panel per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sets, variants, amounts = _ordered(rows)
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], sets):
        for v in variants:
            xs, means, stds = [], [], []
            for a in amounts:
                acc = [100 * r["test_accuracy"] for r in rows if r["set"] == dataset and r["variant"] == v and r["amount"] == a]
                if acc:
                    xs.append(_amount_key(a))
                    means.append(statistics.fmean(acc))
                    stds.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
            if xs:
                style = "-" if v in ("dvs",) or v == DEFAULT_VARIANT else "--"
                color = f"C{list(VARIANTS).index(v) % 10}"  # one colour per variant in every panel
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, linestyle=style, label=v, color=color)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks([_amount_key(a) for a in amounts], [a for a in amounts])
        ax.set_xlabel("labelled event recordings per class" if "/" in amounts[0] else "share of event training data (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated built-in sets (digits, mnist)")
    p.add_argument("--variants", default=",".join(MAIN_VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--per-class", default="2,5,15", help="labelled event recordings per class (comma-separated)")
    p.add_argument("--fractions", default=None, help="shares of the event training pool instead of --per-class")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps per run (epochs are sized to it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--timesteps", type=int, default=6)
    p.add_argument("--evals", type=int, default=5, help="validations per run (best epoch is chosen on them)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--option", "-o", action="append", default=[], help="data option KEY=VALUE for every set (repeatable)")
    p.add_argument("--set", action="append", default=[], help="MethodConfig field KEY=VALUE for every variant")
    p.add_argument("--runs-dir", default="runs/bench-methods")
    p.add_argument("--results", default="docs/results-grid.md", help="markdown file the section goes to")
    p.add_argument("--plot", default="docs/results-methods.png", help="PNG of test accuracy against event data")
    p.add_argument("--append", action="store_true", help="append the section instead of replacing the file")
    p.add_argument("--title", default="Method comparison on the built-in sets")
    p.add_argument("--quick", action="store_true", help="smoke test: digits, 5 per class, seed 0, 40 steps")
    p.add_argument("--from-log", default=None, help="train nothing: tabulate this results.jsonl (e.g. a cut-short grid)")
    args = p.parse_args(argv)
    if args.quick:
        args.sets, args.per_class, args.seeds, args.steps, args.evals = "digits", "5", "0", 40, 4
        args.variants = "dvs,ekt-paper,tmkt-paper,tmkt-shared"
    args.sets = [d.strip() for d in args.sets.split(",") if d.strip()]
    if bad := [d for d in args.sets if d not in SETS]:
        p.error(f"unknown sets {bad}; built in: {', '.join(SETS)}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if bad := [v for v in args.variants if v not in VARIANTS]:
        p.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    args.fractions = _floats(args.fractions) if args.fractions else []
    args.per_class = [] if args.fractions else [int(n) for n in args.per_class.split(",") if n.strip()]
    if any(n < 1 for n in args.per_class) or any(not 0 < f <= 1 for f in args.fractions):
        p.error("--per-class needs counts >= 1 and --fractions shares in (0, 1]")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.options = _parse_kv(args.option, "--option")
    args.set = _parse_kv(args.set, "--set")
    return args


def _done(log: Path) -> dict[str, dict[str, Any]]:
    """Finished runs of an earlier (interrupted) call, keyed by run directory."""
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["run_dir"]: r for r in rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python bench/methods.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.from_log:
        rows = [json.loads(line) for line in Path(args.from_log).read_text().splitlines() if line.strip()]
        _write(markdown(rows, args, command, sum(r["seconds"] for r in rows) / max(1, args.jobs)), args, rows)
        return
    root = Path(args.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "results.jsonl"
    done = _done(log)
    planned = plan_runs(args)
    rows = [done[r["config"]["out"]] for r in planned if r["config"]["out"] in done]
    runs = [r for r in planned if r["config"]["out"] not in done]
    t0 = time.perf_counter()
    print(f"{len(planned)} runs ({len(rows)} already in {log}), {args.jobs} at a time", flush=True)
    failed = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, r): r for r in runs}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as e:  # one failed run is reported at once; the others go on
                out = futures[fut]["config"]["out"]
                failed.append(out)
                print(f"FAILED {out}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exception(e, file=sys.stdout)
                continue
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"[{len(rows)}/{len(planned)}] {row['set']:6s} {row['variant']:20s} {row['amount']:8s} seed={row['seed']} "
                f"test {row['test_accuracy']:.3f} val {row['val_accuracy']:.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    wall = time.perf_counter() - t0 + sum(r["seconds"] for r in rows if r["run_dir"] in done) / max(1, args.jobs)
    if rows:
        _write(markdown(rows, args, command, wall), args, rows)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(runs)} runs failed (not in {log}; a rerun retries them): {', '.join(failed)}")


def _write(section: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + section)
    else:
        out.write_text("# Method comparison (generated by bench/methods.py)\n\n" + section)
    if args.plot:
        plot(rows, args.plot)
    print(section)


if __name__ == "__main__":
    main()
