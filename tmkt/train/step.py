"""One optimisation step and what it depends on: the learning-rate schedule, the per-epoch seeds,
the network + method objective, AdamW, and deterministic kernels on CPU.

`train_step` is shared by the trainer and `bench/train_step.py`, so the bench times the
trainer's own step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from tmkt.train.config import TrainConfig


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Learning rate of iteration `step` (0-based): linear warm-up to `peak`, cosine to `floor`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for one (seed, epoch, rank) stream."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seed_epoch(seed: int, epoch: int, rank: int, generator: torch.Generator) -> None:
    s = epoch_seed(seed, epoch, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    generator.manual_seed(s ^ 0x5DEECE66D)


class Objective(nn.Module):
    """The network and the method loss as one module, so DDP sees one forward per step and
    all-reduces the gradients of both (the method calls the network twice per step)."""

    def __init__(self, net: nn.Module, method: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, static, events, labels, progress: float, generator: torch.Generator):
        return self.method(self.net, static, events, labels, progress, generator)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused implementation, which updates every parameter in a few kernels."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lr: float,
    progress: float,
    generator: torch.Generator,
    device: torch.device,
    amp: bool,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step on a loader batch ``(static, events, labels)`` (static empty for dvs).

    Returns the detached loss and the method's logs, still on the device: nothing here waits for
    the GPU, so the caller decides when to read them (bf16 autocast on CUDA when ``amp``).
    """
    static, events, labels = batch
    for g in optimizer.param_groups:
        g["lr"] = lr
    static = static.to(device, non_blocking=True) if static.numel() else None
    events = events.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    use_amp = amp and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext():
        loss, logs = objective(static, events, labels, progress, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logs


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms` for the duration of training (restored after)."""
    if not enabled:
        yield
        return
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
