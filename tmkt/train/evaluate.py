"""Accuracy of a model's event head on an event dataset.

The prediction is the argmax of the event-head logits averaged over the T steps (the same
rule as the deploy graph's `run_graph`). Evaluation runs in float32 without autocast, so the
number a run reports at the end of training is the one `tmkt eval` gives for its checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def predict(model: torch.nn.Module, events: torch.Tensor) -> torch.Tensor:
    """Class predictions `[B]` for a batch of event frames `[B, T, C, H, W]` (batch-first, as loaded)."""
    out = model(events.transpose(0, 1), head="event")
    return out["logits"].float().mean(0).argmax(-1)


@torch.no_grad()
def confusion(
    model: torch.nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Confusion counts `[K, K]` int64 (row: true class, column: predicted class)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    try:
        for events, labels in loader:
            pred = predict(model, events.to(device, non_blocking=True)).cpu()
            labels = torch.as_tensor(labels, dtype=torch.int64)
            counts += torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).view(
                num_classes, num_classes
            )
    finally:
        model.train(was_training)
    return counts


def summarize(counts: torch.Tensor, class_names: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Accuracy numbers from confusion counts `[K, K]` (JSON-ready).

    Returns `{"accuracy", "correct", "total", "per_class": {name: {"accuracy", "correct",
    "total"}}, "confusion": [[...]]}`; a class without samples has accuracy None.
    """
    k = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    correct = counts.diagonal()
    total = counts.sum(1)
    n = int(total.sum())
    per_class = {
        names[i]: {
            "accuracy": (int(correct[i]) / int(total[i])) if int(total[i]) else None,
            "correct": int(correct[i]),
            "total": int(total[i]),
        }
        for i in range(k)
    }
    return {
        "accuracy": int(correct.sum()) / n if n else float("nan"),
        "correct": int(correct.sum()),
        "total": n,
        "per_class": per_class,
        "confusion": counts.tolist(),
    }


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    class_names: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy of `model`'s event head on `dataset` (items `(events [T, C, H, W], label)`).

    Class names default to `dataset.class_names` when present, else the model's class count.
    See `summarize` for the returned dict.
    """
    names = class_names if class_names is not None else getattr(dataset, "class_names", None)
    k = len(names) if names is not None else model.cfg.num_classes
    return summarize(confusion(model, dataset, k, batch_size, device), names)
