"""What a run reports: per-step sums turned into epoch means (over ranks), `metrics.jsonl` (one
line per epoch) with TensorBoard beside it, the epoch line on the console and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tmkt.checkpoint import atomic_write_bytes
from tmkt.train import distributed as dist_utils

METRICS_NAME = "metrics.jsonl"


def tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def accumulate(sums: dict[str, float], values: dict[str, float], n: int) -> None:
    """Add sample-weighted values and their sample counts (`#key`): some methods log a key only
    in part of the steps (fine-tuning's static phase), so each key keeps its own count."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v * n
        sums[f"#{k}"] = sums.get(f"#{k}", 0.0) + n


def mean(sums: dict[str, float], key: str) -> float:
    """The sample-weighted mean of `key` in `accumulate`'s sums."""
    return sums[key] / sums[f"#{key}"]


def reduce_sums(sums: dict[str, float], info: dist_utils.DistInfo, device: torch.device) -> dict[str, float]:
    """`sums` added over ranks (every rank reports the same keys)."""
    keys = sorted(sums)
    total = dist_utils.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), info, device)
    return dict(zip(keys, total.tolist()))


def reduce_means(sums: dict[str, float], info: dist_utils.DistInfo, device: torch.device) -> dict[str, float]:
    """Sample-weighted means over the epoch and over ranks."""
    if not sums:
        return {"loss": float("nan")}
    d = reduce_sums(sums, info, device)
    return {k: mean(d, k) for k in d if not k.startswith("#")}


def metrics_record(best: dict[str, Any], epochs_done: int) -> dict[str, Any]:
    return {"best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"], "epochs_done": epochs_done}


def append_metrics(path: Path, row: dict[str, Any], tb) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if tb is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        tb.flush()


def truncate_metrics(path: Path, lines: int) -> None:
    """Drop metric lines written after the resume state (an epoch that will be run again)."""
    if path.exists():
        kept = path.read_text().splitlines(keepends=True)[:lines]
        atomic_write_bytes(path, "".join(kept).encode())


def epoch_line(row: dict[str, Any], best: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"loss {row['train_loss']:.4f}"]
    if "train_acc" in row:
        parts.append(f"train acc {row['train_acc']:.3f}")
    if "val_acc" in row:
        parts.append(f"val acc {row['val_acc']:.3f}" + (" *" if best["epoch"] == row["epoch"] else ""))
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return "  ".join(parts)


def progress_bar(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
