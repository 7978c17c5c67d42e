"""Time-step Mixup (TSM): static frames first, paired event frames from a random switch step on.

For each sample a mix ratio ``r`` (the share of event frames wanted on average) is turned into
a per-step switch probability ``p``. Walking ``t = 1..T``, the first step with ``u_t < p``
(``u_t`` uniform) is the switch step ``t*``; frames ``t >= t*`` come from the event sequence,
frames before from the static one. ``t*`` follows a geometric law truncated at ``T``: when no
``u_t < p`` occurs, the sequence stays static (zero event frames). ``p`` is solved so that

    E[#event frames] = sum_{t=1..T} (T + 1 - t) p (1 - p)^(t - 1) = r T.

The left side telescopes to ``T - sum_{k=1..T} q^k`` with ``q = 1 - p`` (the event count is
``sum_k 1[t* <= k]`` and ``P(t* <= k) = 1 - q^k``), which is increasing in ``p`` from 0 (p=0)
to T (p=1), so bisection finds the unique root.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 60 halvings of [0, 1] reach 1e-18, below float64 resolution of p.
_BISECTION_STEPS = 60


def expected_event_frames(p: torch.Tensor, timesteps: int) -> torch.Tensor:
    """E[#event frames] of the truncated geometric switch with per-step probability ``p`` (any shape)."""
    q = 1.0 - p.to(torch.float64)
    k = torch.arange(1, timesteps + 1, dtype=torch.float64, device=p.device)
    return timesteps - (q.unsqueeze(-1) ** k).sum(-1)


def solve_switch_prob(ratio: torch.Tensor, timesteps: int) -> torch.Tensor:
    """Per-step switch probability ``p`` with E[#event frames] = ``ratio * timesteps``.

    ratio: any shape, values in [0, 1]. Returns float64 of the same shape. Vectorised bisection;
    it costs 60 small tensor ops per batch, so there is nothing worth caching.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    r = ratio.to(torch.float64)
    if bool(((r < 0) | (r > 1)).any()):
        raise ValueError("mix ratios must lie in [0, 1]")
    target = r * timesteps
    lo = torch.zeros_like(r)
    hi = torch.ones_like(r)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = expected_event_frames(mid, timesteps) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    p = 0.5 * (lo + hi)
    # The endpoints are exact: never switch (r = 0), always switch at the first step (r = 1).
    return torch.where(r == 0, torch.zeros_like(p), torch.where(r == 1, torch.ones_like(p), p))


@dataclass(frozen=True)
class MixedBatch:
    """One TSM draw.

    mixed: ``[T, B, ...]`` static frames before ``t*``, event frames from ``t*`` on.
    frame_labels: ``[T, B]`` float, 1 where the frame is an event frame (``t >= t*``).
    mix_ratio: ``[B]`` realised share of event frames (mean of ``frame_labels`` over T).
    switch_step: ``[B]`` long, 0-based ``t*``; ``T`` when the sequence stayed static.
    """

    mixed: torch.Tensor
    frame_labels: torch.Tensor
    mix_ratio: torch.Tensor
    switch_step: torch.Tensor


def sample_switch_steps(p: torch.Tensor, timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """0-based first step with ``u_t < p`` per sample (``timesteps`` if none). p: ``[B]``."""
    u = torch.rand((timesteps, p.shape[0]), generator=generator, dtype=torch.float64, device=generator.device)
    hit = u < p.to(device=generator.device, dtype=torch.float64).unsqueeze(0)
    # argmax returns the first maximum; rows without a hit get index 0, hence the fix-up.
    first = hit.to(torch.int8).argmax(dim=0)
    return torch.where(hit.any(dim=0), first, torch.full_like(first, timesteps))


def draw_switch_steps(ratio: torch.Tensor, timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """0-based switch steps ``[B]`` (on the generator's device) for target mix ratios ``[B]``."""
    return sample_switch_steps(solve_switch_prob(ratio, timesteps), timesteps, generator)


def mix_at_switch(static: torch.Tensor, events: torch.Tensor, switch_step: torch.Tensor) -> MixedBatch:
    """The mixed sequences for given 0-based switch steps ``[B]`` (no randomness, no host sync).

    static, events: ``[T, B, ...]`` (time first, same shape).
    """
    timesteps = events.shape[0]
    steps = torch.arange(timesteps, device=events.device).unsqueeze(1)
    is_event = steps >= switch_step.unsqueeze(0)  # [T, B]
    mask = is_event.reshape(is_event.shape + (1,) * (events.ndim - 2))
    mixed = torch.where(mask, events, static)
    labels = is_event.to(events.dtype)
    return MixedBatch(mixed=mixed, frame_labels=labels, mix_ratio=labels.mean(0), switch_step=switch_step)


def time_step_mixup(
    static: torch.Tensor, events: torch.Tensor, ratio: torch.Tensor, generator: torch.Generator
) -> MixedBatch:
    """Mix each static sequence with its paired event sequence at a random switch step.

    static, events: ``[T, B, ...]`` (time first, same shape). ratio: ``[B]`` target mix ratios.
    All randomness comes from ``generator`` (drawn on its device, then moved to the data's).
    """
    if static.shape != events.shape:
        raise ValueError(f"static {tuple(static.shape)} and events {tuple(events.shape)} differ in shape")
    timesteps, batch = events.shape[:2]
    if ratio.shape != (batch,):
        raise ValueError(f"ratio must have shape ({batch},), got {tuple(ratio.shape)}")
    return mix_at_switch(static, events, draw_switch_steps(ratio, timesteps, generator).to(events.device))
