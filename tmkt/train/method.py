"""Training objectives: TMKT and its baselines behind one loss module.

`build_method(cfg, T)` gives a `MethodLoss`; the trainer calls
``loss, logs = method(model, static, events, labels, progress, generator)`` once per batch and
optimises the model's parameters together with the method's own (the per-step alignment
coefficients ``eta``). Every method is evaluated and exported through the event head.

- ``dvs``       events only, event head, TET.
- ``finetune``  static sequences through the event head while ``progress < finetune_switch``,
                then events only (the whole network, classifier included, carries over).
- ``ekt``       EKT (He et al. 2024): each sample's static sequence is replaced by its event
                sequence with probability ``progress ** ekt_power``; that stream goes through the
                mixed head (``source_head``), the event stream through the event head; CKA
                alignment between the two streams' membranes, per-step weights ``sigmoid(eta_t)``.
- ``tmkt``      TMKT (Xie et al. 2025): the static stream is replaced by a time-step mixup of
                static and event frames (`tmkt.train.tsm`); mixed head + MAG + MRP on it; event
                head on the event stream; the same CKA alignment as EKT.

In ekt and tmkt only the event stream updates BatchNorm running statistics (``bn_stats``),
since evaluation sees events alone.

docs/method.md states which constants come from the papers / EKT code and which are ours.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tmkt.train.losses import alignment_loss, linear_cka_per_step, mag_loss, mrp_loss, tet_loss
from tmkt.train.tsm import draw_switch_steps, mix_at_switch

METHODS = ("dvs", "finetune", "ekt", "tmkt")
MIX_SCHEDULES = ("uniform", "progress")
BN_STATS = ("event", "both")
HEADS = ("event", "mixed")


@dataclass(frozen=True)
class MethodConfig:
    """Loss weights and schedules. Defaults marked [EKT] come from the EKT code, [TMKT] from the
    TMKT paper, [ours] are our choices where both are silent (docs/method.md gives reasons)."""

    name: str = "ekt"
    """One of METHODS. Default [ours, measured]: EKT's whole-sequence replacement with the shared
    classifier won on validation in the scarce-event regime of both built-in sets
    (docs/results-methods.md); `--preset paper` gives the TMKT paper's design."""
    tet_lambda: float = 1e-3
    """[EKT] weight of TET's MSE term; the CE term gets 1 - tet_lambda."""
    tet_target: float = 1.0
    """[EKT/ours] constant the MSE term pulls every step's logits to. EKT uses its V_th (0.5 for
    its neuron); the TET paper uses 1.0, which is also our default V_th."""
    label_smoothing: float = 0.1
    """[EKT] label smoothing of the cross-entropy (EKT's timm default)."""
    event_loss_weight: float = 1.0
    """[EKT] weight of the event-stream TET (event head)."""
    static_loss_weight: float = 1.0
    """[EKT] weight of the static / replaced (ekt) or mixed (tmkt) stream TET (mixed head)."""
    align_weight: float = 0.5
    """[EKT] weight of the CKA alignment loss (ekt, tmkt)."""
    eta_init: float = 1.0
    """[EKT] initial value of the learnable per-step coefficients eta_t (weights sigmoid(eta_t))."""
    mag_weight: float = 0.1
    """[ours] weight of the MAG per-frame modality BCE (tmkt)."""
    mrp_weight: float = 0.1
    """[ours] weight of the MRP mix-ratio MSE (tmkt)."""
    mix_ratio_min: float = 0.0
    """[ours] lower end of the mix ratio r (tmkt)."""
    mix_ratio_max: float = 1.0
    """[ours] upper end of the mix ratio r (tmkt)."""
    mix_ratio_schedule: str = "uniform"
    """[ours] 'uniform': r ~ U(min, max) per sample; 'progress': r = min + (max - min) *
    progress ** mix_ratio_power for the whole batch (a curriculum towards events, as EKT's)."""
    mix_ratio_power: float = 1.0
    """[ours] exponent of the 'progress' schedule."""
    finetune_switch: float = 0.5
    """[EKT ablation] fraction of training spent on static data before switching to events (finetune)."""
    ekt_power: float = 3.0
    """[EKT] replacement probability is progress ** ekt_power (ekt)."""
    source_head: str = "event"
    """[ours, measured] classifier of the static / replaced (ekt) or mixed (tmkt) stream: 'event'
    shares the event head, so the deployed classifier learns from every static image; 'mixed' is
    the papers' separate head (`--preset paper`), which did not beat events-only training here."""
    bn_stats: str = "event"
    """[ours] which stream updates BatchNorm running statistics (ekt, tmkt). Evaluation sees
    events only, so 'event' keeps the static / mixed stream from moving them (it still uses its
    own batch statistics in training); 'both' is EKT's code, where the two calls per step blend
    static and event statistics into the running estimates used at test time."""

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method.name must be one of {METHODS}, got {self.name!r}")
        if self.source_head not in HEADS:
            raise ValueError(f"method.source_head must be one of {HEADS}, got {self.source_head!r}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"method.bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        if self.mix_ratio_schedule not in MIX_SCHEDULES:
            raise ValueError(f"method.mix_ratio_schedule must be one of {MIX_SCHEDULES}, got {self.mix_ratio_schedule!r}")
        if not 0.0 <= self.mix_ratio_min <= self.mix_ratio_max <= 1.0:
            raise ValueError(
                f"need 0 <= mix_ratio_min <= mix_ratio_max <= 1, got {self.mix_ratio_min}, {self.mix_ratio_max}"
            )
        for unit in ("tet_lambda", "finetune_switch", "label_smoothing"):
            if not 0.0 <= getattr(self, unit) <= 1.0:
                raise ValueError(f"method.{unit} must lie in [0, 1], got {getattr(self, unit)}")
        for name in ("event_loss_weight", "static_loss_weight", "align_weight", "mag_weight", "mrp_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ekt_power", "mix_ratio_power"):
            if not getattr(self, name) > 0:
                raise ValueError(f"method.{name} must be > 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        """Inverse of `to_dict`; missing fields take their defaults, unknown or mistyped ones raise."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(kinds)
        if unknown:
            raise ValueError(f"unknown method config fields: {sorted(unknown)}")
        values: dict[str, Any] = {}
        for key, value in d.items():
            kind = kinds[key]
            if kind == "str" and isinstance(value, str):
                values[key] = value
            elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
            else:
                raise ValueError(f"method.{key} must be a {kind}, got {value!r}")
        return cls(**values)


@contextmanager
def _frozen_bn_stats(model: nn.Module, enabled: bool) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave running statistics as they are
    (momentum 0), restoring each layer's momentum afterwards."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)] if enabled else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


def _f(x: torch.Tensor) -> torch.Tensor:
    """A log value: a detached 0-d tensor. It stays on the device, so logging never forces a
    host sync inside a step (the trainer turns logs into floats after queueing the next step)."""
    return x.detach()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of samples whose mean-over-T logits pick the label; logits ``[T, B, K]``."""
    return (logits.detach().mean(0).argmax(-1) == labels).float().mean()


class MethodLoss(nn.Module):
    """The objective of one method. Owns ``eta`` ``[T]``, the learnable per-step coefficients of
    the CKA alignment (ekt, tmkt; unused otherwise), so the optimiser must see its parameters.

    A call runs in two parts: the eager part validates shapes and draws the step's randomness
    from the generator (mix ratios and switch steps, replacements) and its schedule values;
    `core` is then pure tensor work, both forward passes and every loss, with no host sync and
    no Python branch on tensor values. `compile_core()` puts `core` under `torch.compile` as one
    graph (fullgraph), which is what `tmkt train --compile` uses.
    """

    def __init__(self, cfg: MethodConfig, timesteps: int) -> None:
        super().__init__()
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.cfg = cfg
        self.timesteps = timesteps
        self.eta = nn.Parameter(torch.full((timesteps,), float(cfg.eta_init)))
        self._core = self.core

    @property
    def unused_parameters_possible(self) -> bool:
        """Whether a step may leave some parameter without a gradient (DDP must then look for it):
        only TMKT with the papers' separate head uses every head, MAG, MRP and eta in every step."""
        return not (self.cfg.name == "tmkt" and self.cfg.source_head == "mixed")

    @property
    def needs_static_images(self) -> bool:
        """Whether the method trains on static images (every method but events-only `dvs`)."""
        return self.cfg.name != "dvs"

    def compile_core(self, **options: Any) -> "MethodLoss":
        """Compile `core` (both streams' forward and all losses) as one graph; ``options`` go to
        `torch.compile`. Defaults: ``fullgraph=True`` (a graph break is not silent: it warns once
        and falls back to compiling in pieces) and ``dynamic=False`` (a smaller last batch gets
        its own static graph, compiled once, instead of turning every shape symbolic)."""
        options.setdefault("fullgraph", True)
        options.setdefault("dynamic", False)
        from torch._dynamo.exc import Unsupported

        compiled = torch.compile(self.core, **options)
        if not options["fullgraph"]:
            self._core = compiled
            return self

        def core(*args: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # A graph break (e.g. a kernel provider's Python on a platform not tested here)
            # should cost speed, not the run: warn, then compile in pieces.
            try:
                return compiled(*args)
            except Unsupported as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                warnings.warn(
                    f"torch.compile could not capture the training step as one graph ({first}); "
                    "compiling it in pieces instead, which is slower", RuntimeWarning, stacklevel=2,
                )
                self._core = torch.compile(self.core, **{**options, "fullgraph": False})
                return self._core(*args)

        self._core = core
        return self

    def _tet(self, logits: torch.Tensor, labels: torch.Tensor, step_weights: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        return tet_loss(
            logits, labels, lam=c.tet_lambda, target=c.tet_target, step_weights=step_weights,
            label_smoothing=c.label_smoothing,
        )

    def forward(
        self,
        model: nn.Module,
        static: torch.Tensor | None,
        events: torch.Tensor,
        labels: torch.Tensor,
        progress: float,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Loss of one batch and its logs (detached 0-d tensors, or floats for schedule values).

        static, events: ``[B, T, C, H, W]`` as a DataLoader yields them (static may be None for
        ``dvs``); labels: ``[B]``; progress: fraction of training done, in [0, 1]; generator:
        the only source of randomness (mix ratios, switch steps, replacements).
        """
        if events.ndim != 5 or events.shape[1] != self.timesteps:
            raise ValueError(f"events must be [B, T={self.timesteps}, C, H, W], got {tuple(events.shape)}")
        ev = events.transpose(0, 1)
        st = None
        if static is not None:
            if static.shape != events.shape:
                raise ValueError(f"static {tuple(static.shape)} and events {tuple(events.shape)} differ in shape")
            st = static.transpose(0, 1)
        progress = min(max(float(progress), 0.0), 1.0)
        c, batch = self.cfg, ev.shape[1]
        if c.name != "dvs" and st is None:
            raise ValueError(f"method {c.name!r} needs static sequences, got static=None")
        static_phase, draw, extra = False, None, {}
        if c.name == "finetune":
            static_phase = progress < c.finetune_switch
            extra["static_phase"] = float(static_phase)
        elif c.name == "ekt":
            p_replace = progress ** c.ekt_power
            u = torch.rand(batch, generator=generator, device=generator.device)
            draw = (u < p_replace).to(ev.device)
            extra["replace_prob"] = p_replace
        elif c.name == "tmkt":
            draw = draw_switch_steps(self._mix_ratio(batch, progress, generator), self.timesteps, generator).to(ev.device)
        loss, logs = self._core(model, st, ev, labels, draw, static_phase)
        return loss, {**logs, **extra}

    def core(
        self,
        model: nn.Module,
        st: torch.Tensor | None,
        ev: torch.Tensor,
        labels: torch.Tensor,
        draw: torch.Tensor | None,
        static_phase: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tensor part of a step: the sum of `terms`, in their order, and the logs."""
        terms, logs = self.terms(model, st, ev, labels, draw, static_phase)
        parts = iter(terms.values())
        loss = next(parts)
        for part in parts:
            loss = loss + part
        return loss, {"loss": _f(loss), **logs}

    def terms(
        self,
        model: nn.Module,
        st: torch.Tensor | None,
        ev: torch.Tensor,
        labels: torch.Tensor,
        draw: torch.Tensor | None,
        static_phase: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The objective's weighted terms (``event``, ``src``, ``align``, ``mag``, ``mrp``: those the
        method has; the loss is their sum in this order) and the step's logs. st, ev: ``[T, B, ...]``;
        draw: ekt's replacement mask ``[B]`` (bool) or tmkt's 0-based switch steps ``[B]`` (long),
        None otherwise; static_phase: finetune's phase. Diagnostics take gradients of each term."""
        name, c = self.cfg.name, self.cfg
        if name == "dvs" or (name == "finetune" and not static_phase):
            out = model(ev, head="event")
            term = c.event_loss_weight * self._tet(out["logits"], labels)
            return {"event": term}, {"tet_event": _f(term), "acc_event": _accuracy(out["logits"], labels)}
        if name == "finetune":
            out = model(st, head="event")
            term = c.static_loss_weight * self._tet(out["logits"], labels)
            return {"src": term}, {"tet_static": _f(term), "acc_static": _accuracy(out["logits"], labels)}
        if name == "ekt":
            src = torch.where(draw.reshape((1, -1) + (1,) * (ev.ndim - 2)), ev, st)
            terms, _, logs = self._two_streams(model, src, ev, labels, aux=False)
            return terms, logs
        return self._tmkt(model, st, ev, labels, draw)

    def _two_streams(
        self, model: nn.Module, src: torch.Tensor, ev: torch.Tensor, labels: torch.Tensor, aux: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Shared by ekt and tmkt: TETs of both streams + weighted CKA alignment of their membranes."""
        c = self.cfg
        with _frozen_bn_stats(model, c.bn_stats == "event"):
            out_s = model(src, head=c.source_head, aux=aux)
        out_e = model(ev, head="event")
        w = torch.sigmoid(self.eta)
        cka = linear_cka_per_step(out_s["membrane"], out_e["membrane"])
        l_align = alignment_loss(cka, w)
        l_src = self._tet(out_s["logits"], labels)
        l_ev = self._tet(out_e["logits"], labels, step_weights=1.0 - w)
        terms = {"src": c.static_loss_weight * l_src, "event": c.event_loss_weight * l_ev,
                 "align": c.align_weight * l_align}
        logs = {
            "tet_mixed": _f(l_src), "tet_event": _f(l_ev), "align": _f(l_align),
            "cka": _f(cka.abs().mean()), "eta_weight": _f(w.mean()),
            "acc_event": _accuracy(out_e["logits"], labels), "acc_mixed": _accuracy(out_s["logits"], labels),
        }
        return terms, out_s, logs

    def _mix_ratio(self, batch: int, progress: float, generator: torch.Generator) -> torch.Tensor:
        c = self.cfg
        if c.mix_ratio_schedule == "progress":
            r = c.mix_ratio_min + (c.mix_ratio_max - c.mix_ratio_min) * progress ** c.mix_ratio_power
            return torch.full((batch,), r, dtype=torch.float64)
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=generator.device)
        return c.mix_ratio_min + (c.mix_ratio_max - c.mix_ratio_min) * u

    def _tmkt(
        self, model: nn.Module, st: torch.Tensor, ev: torch.Tensor, labels: torch.Tensor, switch_step: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        c = self.cfg
        mix = mix_at_switch(st, ev, switch_step)
        terms, out_m, logs = self._two_streams(model, mix.mixed, ev, labels, aux=True)
        l_mag = mag_loss(out_m["mag"], mix.frame_labels)
        l_mrp = mrp_loss(out_m["mrp"], mix.mix_ratio)
        terms.update(mag=c.mag_weight * l_mag, mrp=c.mrp_weight * l_mrp)
        mag_acc = ((out_m["mag"].detach() > 0).to(mix.frame_labels.dtype) == mix.frame_labels).float().mean()
        return terms, {
            **logs, "mag": _f(l_mag), "mrp": _f(l_mrp), "acc_mag": mag_acc, "mix_ratio": _f(mix.mix_ratio.mean()),
        }


# Named method configurations. `paper` is the TMKT paper's design as far as it is public, on EKT's
# code where the paper is silent: a separate classifier for the mixed stream (EKT's rgb_fc /
# dvs_fc), BatchNorm running statistics blended from both streams (EKT's two calls per step),
# r ~ U(0, 1) per sample, MAG and MRP at 0.1 (ours: the paper gives no weights), EKT's TET, CKA
# alignment and eta. docs/method.md lists each field's source.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "name": "tmkt", "source_head": "mixed", "bn_stats": "both", "mix_ratio_schedule": "uniform",
        "mix_ratio_min": 0.0, "mix_ratio_max": 1.0, "mag_weight": 0.1, "mrp_weight": 0.1,
        "tet_lambda": 1e-3, "tet_target": 1.0, "label_smoothing": 0.1, "event_loss_weight": 1.0,
        "static_loss_weight": 1.0, "align_weight": 0.5, "eta_init": 1.0,
    },
}


def method_preset(preset: str, **overrides: Any) -> MethodConfig:
    """The named preset (``METHOD_PRESETS``) as a ``MethodConfig``, with ``overrides`` on top."""
    if preset not in METHOD_PRESETS:
        raise ValueError(f"unknown method preset {preset!r}; presets: {', '.join(METHOD_PRESETS)}")
    return MethodConfig.from_dict({**METHOD_PRESETS[preset], **overrides})


def build_method(cfg: MethodConfig, timesteps: int) -> MethodLoss:
    """The loss module of ``cfg.name`` for sequences of ``timesteps`` steps."""
    return MethodLoss(cfg, timesteps)
