"""Loss terms of TMKT and its baselines, as plain functions on time-first tensors.

- `tet_loss`: TET (Deng et al. 2022) as EKT uses it: a cross-entropy at every step plus a small
  MSE pulling every step's logits towards a constant, optionally weighted per step.
- `linear_cka` / `linear_cka_per_step`: linear centred kernel alignment (Kornblith et al. 2019).
- `alignment_loss`: EKT's domain loss, (1/T) sum_t w_t (1 - |CKA_t|).
- `mag_loss`: per-frame modality (static = 0, event = 1) BCE on logits.
- `mrp_loss`: squared error of the predicted mix ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Added under square roots and to denominators: keeps CKA finite (and its gradient too) when a
# stream's features are constant over the batch, e.g. a layer that never fires.
CKA_EPS = 1e-12


def tet_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = 1e-3,
    target: float = 1.0,
    step_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """TET: ``(1 - lam) mean_t w_t CE(o_t, y) + lam mean_t w_t MSE(o_t, target)``.

    logits: ``[T, B, K]`` per-step logits; labels: ``[B]`` class indices; step_weights: ``[T]``
    (all ones when None). CE and MSE are means over the batch (and over classes for the MSE).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [T, B, K], got {tuple(logits.shape)}")
    timesteps, batch, classes = logits.shape
    ce = F.cross_entropy(
        logits.reshape(timesteps * batch, classes),
        labels.repeat(timesteps),
        reduction="none",
        label_smoothing=label_smoothing,
    ).reshape(timesteps, batch).mean(1)
    mse = ((logits - target) ** 2).mean(dim=(1, 2))
    if step_weights is not None:
        ce = ce * step_weights
        mse = mse * step_weights
    return (1.0 - lam) * ce.mean() + lam * mse.mean()


def _center(x: torch.Tensor) -> torch.Tensor:
    """Center over the batch axis (-2) and scale to unit Frobenius norm (CKA is scale free; this
    keeps the Gram entries O(1) whatever the membrane magnitude)."""
    x = x - x.mean(dim=-2, keepdim=True)
    return x / torch.sqrt((x * x).sum(dim=(-2, -1), keepdim=True) + CKA_EPS)


def linear_cka_per_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between ``x[t]`` and ``y[t]`` for every leading index t.

    x: ``[..., B, N]``, y: ``[..., B, M]`` (same leading shape and batch B). Returns ``[...]``.
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on batch-centred features, computed through
    the ``B x B`` Gram matrices when features are wider than the batch (the usual case for
    membranes) and through the feature covariances otherwise; both give the same number.
    """
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must agree up to the feature axis")
    xc, yc = _center(x.float()), _center(y.float())
    b, n, m = x.shape[-2], x.shape[-1], y.shape[-1]
    if max(n, m) > b:
        kx = xc @ xc.transpose(-1, -2)  # [..., B, B]
        ky = yc @ yc.transpose(-1, -2)
        hsic = (kx * ky).sum(dim=(-2, -1))
        nx = torch.sqrt((kx * kx).sum(dim=(-2, -1)) + CKA_EPS)
        ny = torch.sqrt((ky * ky).sum(dim=(-2, -1)) + CKA_EPS)
    else:
        cross = yc.transpose(-1, -2) @ xc  # [..., M, N]
        cx = xc.transpose(-1, -2) @ xc
        cy = yc.transpose(-1, -2) @ yc
        hsic = (cross * cross).sum(dim=(-2, -1))
        nx = torch.sqrt((cx * cx).sum(dim=(-2, -1)) + CKA_EPS)
        ny = torch.sqrt((cy * cy).sum(dim=(-2, -1)) + CKA_EPS)
    return hsic / (nx * ny + CKA_EPS)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of two feature matrices ``x [B, N]`` and ``y [B, M]`` (a 0-d tensor)."""
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError("linear_cka takes two [B, features] matrices")
    return linear_cka_per_step(x, y)


def alignment_loss(cka: torch.Tensor, step_weights: torch.Tensor) -> torch.Tensor:
    """EKT's domain loss ``(1/T) sum_t w_t (1 - |CKA_t|)``; cka, step_weights: ``[T]``."""
    return (step_weights * (1.0 - cka.abs())).mean()


def mag_loss(mag_logits: torch.Tensor, frame_labels: torch.Tensor) -> torch.Tensor:
    """Modality-aware guidance: BCE-with-logits of ``[T, B]`` frame logits against 1[event frame]."""
    return F.binary_cross_entropy_with_logits(mag_logits, frame_labels.to(mag_logits.dtype))


def mrp_loss(pred_ratio: torch.Tensor, mix_ratio: torch.Tensor) -> torch.Tensor:
    """Mix-ratio perception: mean squared error of ``[B]`` predicted vs realised share of event frames."""
    return F.mse_loss(pred_ratio, mix_ratio.to(pred_ratio.dtype))
