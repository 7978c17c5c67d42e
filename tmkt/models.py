"""Spiking backbones on spikingjelly 2.0 LIF neurons, with the heads TMKT needs.

Every backbone is one trunk (a `torch.nn.Sequential` of multi-step spikingjelly layers and
`SpikingBasicBlock`s, input `[T, B, C, H, W]`, output spikes `[T, B, F]`) and four heads:

- `event_head`  Linear F -> classes, the head that is evaluated and exported;
- `mixed_head`  Linear F -> classes, for the mixed (static + event) stream;
- `mag_head`    Linear F -> 1 per frame: modality-aware guidance (is this frame an event frame?);
- `mrp_head`    Linear F -> 1 per sequence: mix-ratio perception (share of event frames).

The neuron is the contract of DESIGN.md: `v[t] = v[t-1] - v[t-1]/tau + I[t]`, spike when
`v[t] >= v_th`, hard reset to 0 (`LIFNode(decay_input=False, v_reset=0.0)`).

The trunk uses only module kinds that `tmkt.export.graph.lower` knows: Conv2d, BatchNorm2d,
LIFNode, AvgPool2d, AdaptiveAvgPool2d(1), Flatten and SpikingBasicBlock. Pooling follows the LIF,
so synaptic layers after the first see pooled spikes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from spikingjelly.activation_based import base, layer, neuron, surrogate
from torch import nn

BACKBONES = ("small", "vgg", "resnet18")


@dataclass(frozen=True)
class NeuronConfig:
    """LIF parameters shared by every neuron layer (DESIGN.md contract)."""

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float = 0.0
    surrogate: str = "atan"  # atan | sigmoid | piecewise_quadratic (EKT's quadratic gate)
    surrogate_alpha: float = 2.0

    def __post_init__(self) -> None:
        if not self.tau > 1.0:
            raise ValueError(f"neuron.tau must be > 1, got {self.tau}")
        if self.v_reset != 0.0:
            raise ValueError("neuron.v_reset must be 0.0 (hard reset to zero is the deploy contract)")
        if self.surrogate not in _SURROGATES:
            raise ValueError(f"neuron.surrogate must be one of {sorted(_SURROGATES)}, got {self.surrogate!r}")


_SURROGATES = {
    "atan": surrogate.ATan,
    "sigmoid": surrogate.Sigmoid,
    "piecewise_quadratic": surrogate.PiecewiseQuadratic,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network, with no trainer defaults involved."""

    backbone: str = "small"
    num_classes: int = 10
    in_channels: int = 2
    input_size: tuple[int, int] = (32, 32)  # (H, W)
    width: float = 1.0  # channel multiplier
    neuron: NeuronConfig = field(default_factory=NeuronConfig)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (H, W), got {self.input_size}")
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {"backbone", "num_classes", "in_channels", "input_size", "width", "neuron"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        missing = known - set(d)
        if missing:
            raise ValueError(f"model config is missing fields: {sorted(missing)}")
        return cls(
            backbone=str(d["backbone"]),
            num_classes=int(d["num_classes"]),
            in_channels=int(d["in_channels"]),
            input_size=tuple(int(v) for v in d["input_size"]),
            width=float(d["width"]),
            neuron=NeuronConfig(**d["neuron"]),
        )


def make_lif(cfg: NeuronConfig) -> neuron.LIFNode:
    """One multi-step LIF layer with the contract's dynamics."""
    return neuron.LIFNode(
        tau=float(cfg.tau),
        decay_input=False,
        v_threshold=float(cfg.v_threshold),
        v_reset=0.0,
        surrogate_function=_SURROGATES[cfg.surrogate](alpha=cfg.surrogate_alpha),
        detach_reset=True,
        step_mode="m",
    )


def _conv_bn_lif(cin: int, cout: int, ncfg: NeuronConfig, stride: int = 1) -> list[nn.Module]:
    return [
        layer.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, step_mode="m"),
        layer.BatchNorm2d(cout, step_mode="m"),
        make_lif(ncfg),
    ]


class SpikingBasicBlock(nn.Module):
    """ResNet basic block: LIF(BN(conv(LIF(BN(conv(x))))) + shortcut(x)); the sum is of currents."""

    def __init__(self, cin: int, cout: int, stride: int, ncfg: NeuronConfig) -> None:
        super().__init__()
        self.conv1 = layer.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, step_mode="m")
        self.bn1 = layer.BatchNorm2d(cout, step_mode="m")
        self.lif1 = make_lif(ncfg)
        self.conv2 = layer.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False, step_mode="m")
        self.bn2 = layer.BatchNorm2d(cout, step_mode="m")
        self.shortcut: nn.Sequential = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                layer.Conv2d(cin, cout, 1, stride=stride, bias=False, step_mode="m"),
                layer.BatchNorm2d(cout, step_mode="m"),
            )
        self.lif2 = make_lif(ncfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.lif1(self.bn1(self.conv1(x)))))
        return self.lif2(out + self.shortcut(x))


def _c(width: float, channels: int) -> int:
    return max(1, int(round(channels * width)))


def build_trunk(cfg: ModelConfig) -> tuple[nn.Sequential, int]:
    """The trunk for `cfg.backbone` and its flattened feature size F."""
    n, w = cfg.neuron, cfg.width
    h, wd = cfg.input_size
    mods: list[nn.Module] = []
    if cfg.backbone == "small":
        chans = [_c(w, 16), _c(w, 32), _c(w, 64)]
        cin = cfg.in_channels
        for c in chans:
            mods += _conv_bn_lif(cin, c, n) + [layer.AvgPool2d(2, step_mode="m")]
            cin = c
            h, wd = h // 2, wd // 2
        feat = cin * h * wd
    elif cfg.backbone == "vgg":
        # EKT / TMKT VGG-SNN: 64C3-128C3-AP2-256C3-256C3-AP2-512C3-512C3-AP2-512C3-512C3-AP2
        plan = [(64, 128), (256, 256), (512, 512), (512, 512)]
        cin = cfg.in_channels
        for a, b in plan:
            mods += _conv_bn_lif(cin, _c(w, a), n) + _conv_bn_lif(_c(w, a), _c(w, b), n)
            mods.append(layer.AvgPool2d(2, step_mode="m"))
            cin = _c(w, b)
            h, wd = h // 2, wd // 2
        feat = cin * h * wd
    else:  # resnet18
        cin = _c(w, 64)
        mods += _conv_bn_lif(cfg.in_channels, cin, n)
        for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
            mods.append(SpikingBasicBlock(cin, _c(w, cout), stride, n))
            cin = _c(w, cout)
        mods.append(layer.AdaptiveAvgPool2d((1, 1), step_mode="m"))
        feat = cin
    if feat < 1:
        raise ValueError(f"input_size {cfg.input_size} is too small for backbone {cfg.backbone!r}")
    mods.append(layer.Flatten(start_dim=1, step_mode="m"))
    return nn.Sequential(*mods), feat


def _last_lif(trunk: nn.Module) -> neuron.LIFNode:
    lifs = [m for m in trunk.modules() if isinstance(m, neuron.LIFNode)]
    return lifs[-1]


class SpikingNet(nn.Module):
    """Trunk + event/mixed classifier heads + MAG and MRP heads.

    `forward(x)` takes `[T, B, C, H, W]` and returns a dict with
    - `features` `[T, B, F]` trunk output (pooled spikes),
    - `membrane` `[T, B, N]` the last LIF layer's membrane potential before reset (for CKA),
    - `logits` `[T, B, K]` per-step logits of the requested head (`"event"` or `"mixed"`),
    - `mag` `[T, B]` per-frame modality logits (event = 1), `mrp` `[B]` estimated mix ratio in [0, 1]
      (only when `aux=True`).
    Neuron state is reset at the start of every call, so two streams never share state.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk, feat = build_trunk(cfg)
        self.num_features = feat
        self.event_head = nn.Linear(feat, cfg.num_classes)
        self.mixed_head = nn.Linear(feat, cfg.num_classes)
        self.mag_head = nn.Linear(feat, 1)
        self.mrp_head = nn.Linear(feat, 1)
        self._tap = _last_lif(self.trunk)
        self._tap_input: torch.Tensor | None = None
        self._tap.register_forward_pre_hook(self._capture_input)
        self._tap.store_v_seq = True
        # The stateful layers, collected once: reset in forward without spikingjelly's reset_net,
        # whose process-wide module cache torch.compile would guard on (and recompile for).
        self._stateful = tuple(m for m in self.trunk.modules() if isinstance(m, base.MemoryModule))

    def _capture_input(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._tap_input = args[0]

    def _membrane(self) -> torch.Tensor:
        """Pre-reset membrane h[t] = v[t-1] - v[t-1]/tau + I[t] of the tapped LIF, `[T, B, N]`."""
        i = self._tap_input
        v_after = self._tap.v_seq  # post-reset potentials, [T, B, ...]
        v_prev = torch.cat([torch.zeros_like(v_after[:1]), v_after[:-1]], dim=0)
        h = v_prev - v_prev / self.cfg.neuron.tau + i
        return h.flatten(2)

    def forward(self, x: torch.Tensor, head: str = "event", aux: bool = False) -> dict[str, torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"expected input [T, B, C, H, W], got shape {tuple(x.shape)}")
        self._reset_state()
        feats = self.trunk(x)
        out: dict[str, torch.Tensor] = {"features": feats, "membrane": self._membrane()}
        if head == "event":
            out["logits"] = self.event_head(feats)
        elif head == "mixed":
            out["logits"] = self.mixed_head(feats)
        else:
            raise ValueError(f"head must be 'event' or 'mixed', got {head!r}")
        if aux:
            out["mag"] = self.mag_head(feats).squeeze(-1)
            out["mrp"] = torch.sigmoid(self.mrp_head(feats.mean(0))).squeeze(-1)
        self._tap_input = None
        # Leave every state at its reset value (not a tensor from this call): the next call then
        # starts from the same Python state, which keeps torch.compile from recompiling on it.
        self._reset_state()
        return out

    def _reset_state(self) -> None:
        for m in self._stateful:
            m.reset()


def build_model(cfg: ModelConfig) -> SpikingNet:
    """Build the network described by `cfg` (random initialisation)."""
    return SpikingNet(cfg)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0, bias_mean: float = 0.3) -> nn.Module:
    """Give every BatchNorm2d random eval statistics and affine terms, biased so neurons spike.

    For tests, benchmarks and export checks of untrained networks: a freshly built net has
    identity BatchNorm and barely spikes, which would make spike-for-spike comparisons vacuous.
    Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.8 + 0.4)
            m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.3 + bias_mean)
    return model.eval()
