"""The deploy graph: the one structure every exporter, the simulator and the profiler read.

Nodes are small dataclasses of numpy arrays (NIR-style), checked in `__post_init__`.
BatchNorm is folded into the preceding synaptic layer; only the event head is kept. No
spikingjelly inside: `run_graph` executes it with plain torch step functions and must equal the
trained spikingjelly network spike for spike.

Graph semantics, per time step t, in topological (insertion) order:
- `Input`      the frame x[t], shape (C, H, W);
- `Conv2d`, `Dense`  synaptic layers (float32 weight and bias);
- `AvgPool2d`  average pooling (count_include_pad, no ceil);
- `Flatten`    (C, H, W) -> (C*H*W,);
- `Add`        element-wise sum of its inputs (residual currents);
- `LIF`        v = v - v/tau + I; s = v >= v_th; v = 0 where s   (state v, per layer);
- the graph's `output` node gives per-step logits; the prediction is their mean over T.
Shapes exclude the batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tmkt.errors import TmktError


def as_pair(v: Any) -> tuple[int, int]:
    """`v` or `(v, v)` as a pair of ints ((y, x) of a kernel, stride, padding or dilation)."""
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


def _f32(a: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


@dataclass(eq=False)
class Input:
    shape: tuple[int, ...]  # (C, H, W)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"Input.shape must be (C, H, W), got {self.shape}")


@dataclass(eq=False)
class Conv2d:
    weight: np.ndarray  # [O, I/groups, kh, kw]
    bias: np.ndarray  # [O]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        self.weight = _f32(self.weight, "Conv2d.weight", 4)
        self.bias = _f32(self.bias, "Conv2d.bias", 1)
        self.stride, self.padding, self.dilation = as_pair(self.stride), as_pair(self.padding), as_pair(self.dilation)
        self.groups = int(self.groups)
        if self.bias.shape[0] != self.weight.shape[0]:
            raise ValueError(f"Conv2d.bias has {self.bias.shape[0]} entries for {self.weight.shape[0]} output channels")
        if self.weight.shape[0] % self.groups:
            raise ValueError(f"Conv2d: {self.weight.shape[0]} output channels not divisible by groups={self.groups}")

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])


@dataclass(eq=False)
class Dense:
    weight: np.ndarray  # [O, I]
    bias: np.ndarray  # [O]

    def __post_init__(self) -> None:
        self.weight = _f32(self.weight, "Dense.weight", 2)
        self.bias = _f32(self.bias, "Dense.bias", 1)
        if self.bias.shape[0] != self.weight.shape[0]:
            raise ValueError(f"Dense.bias has {self.bias.shape[0]} entries for {self.weight.shape[0]} outputs")


@dataclass(eq=False)
class AvgPool2d:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.kernel_size, self.stride, self.padding = as_pair(self.kernel_size), as_pair(self.stride), as_pair(self.padding)


@dataclass(eq=False)
class Flatten:
    pass


@dataclass(eq=False)
class Add:
    pass


@dataclass(eq=False)
class LIF:
    tau: float
    v_threshold: float
    v_reset: float = 0.0

    def __post_init__(self) -> None:
        self.tau, self.v_threshold, self.v_reset = float(self.tau), float(self.v_threshold), float(self.v_reset)
        if not self.tau > 1.0:
            raise ValueError(f"LIF.tau must be > 1, got {self.tau}")


Node = Union[Input, Conv2d, Dense, AvgPool2d, Flatten, Add, LIF]
NODE_TYPES: tuple[type, ...] = (Input, Conv2d, Dense, AvgPool2d, Flatten, Add, LIF)


class GraphError(TmktError, ValueError):
    """A malformed deploy graph or a layer a target cannot take (the message names the layer)."""


@dataclass(eq=False)
class DeployGraph:
    """Nodes in topological order; `inputs[name]` lists the nodes feeding `name`."""

    nodes: dict[str, Node]
    inputs: dict[str, tuple[str, ...]]
    output: str
    meta: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = list(self.nodes)
        if not names or not isinstance(self.nodes[names[0]], Input):
            raise GraphError("the first node must be the Input")
        seen: set[str] = set()
        for name in names:
            node = self.nodes[name]
            if not isinstance(node, NODE_TYPES):
                raise GraphError(f"node {name!r}: unknown node type {type(node).__name__}")
            ins = tuple(self.inputs.get(name, ()))
            self.inputs[name] = ins
            for i in ins:
                if i not in seen:
                    raise GraphError(f"node {name!r}: input {i!r} is not an earlier node")
            want = 0 if isinstance(node, Input) else (None if isinstance(node, Add) else 1)
            if want is not None and len(ins) != want:
                raise GraphError(f"node {name!r} ({type(node).__name__}) needs {want} input(s), got {len(ins)}")
            if isinstance(node, Add) and len(ins) < 2:
                raise GraphError(f"node {name!r} (Add) needs at least 2 inputs")
            seen.add(name)
        if self.output not in self.nodes:
            raise GraphError(f"output {self.output!r} is not a node")
        self.shapes = infer_shapes(self)

    @property
    def input_name(self) -> str:
        return next(iter(self.nodes))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[self.input_name].shape  # type: ignore[union-attr]

    def lif_names(self) -> list[str]:
        return [n for n, node in self.nodes.items() if isinstance(node, LIF)]

    def consumers(self, name: str) -> list[str]:
        return [n for n, ins in self.inputs.items() if name in ins]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Length of a convolution's (or pooling's) output along one axis of length `size`."""
    k, s, p, d = kernel, stride, padding, dilation
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def infer_shapes(g: DeployGraph) -> dict[str, tuple[int, ...]]:
    """Output shape of every node (batch axis excluded); raises GraphError naming the node."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, node in g.nodes.items():
        ins = [shapes[i] for i in g.inputs[name]]
        if isinstance(node, Input):
            out = node.shape
        elif isinstance(node, Conv2d):
            (s,) = ins
            if len(s) != 3 or s[0] != node.in_channels:
                raise GraphError(f"node {name!r} (Conv2d): input shape {s} does not match {node.in_channels} channels")
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = node.kernel_size, node.stride, node.padding, node.dilation
            out = (node.out_channels, conv_output_size(s[1], kh, sh, ph, dh), conv_output_size(s[2], kw, sw, pw, dw))
        elif isinstance(node, Dense):
            (s,) = ins
            if len(s) != 1 or s[0] != node.weight.shape[1]:
                raise GraphError(f"node {name!r} (Dense): input shape {s} does not match {node.weight.shape[1]} inputs")
            out = (node.weight.shape[0],)
        elif isinstance(node, AvgPool2d):
            (s,) = ins
            if len(s) != 3:
                raise GraphError(f"node {name!r} (AvgPool2d): needs (C, H, W) input, got {s}")
            (kh, kw), (sh, sw), (ph, pw) = node.kernel_size, node.stride, node.padding
            out = (s[0], conv_output_size(s[1], kh, sh, ph, 1), conv_output_size(s[2], kw, sw, pw, 1))
        elif isinstance(node, Flatten):
            (s,) = ins
            out = (int(np.prod(s)),)
        elif isinstance(node, Add):
            if len(set(ins)) != 1:
                raise GraphError(f"node {name!r} (Add): input shapes differ: {ins}")
            out = ins[0]
        else:  # LIF
            (out,) = ins
        if min(out) < 1:
            raise GraphError(f"node {name!r} ({type(node).__name__}): empty output shape {out}")
        shapes[name] = tuple(int(v) for v in out)
    return shapes


# ---------------------------------------------------------------- step functions (pure torch)


def lif_charge(i: torch.Tensor, v: torch.Tensor, node: LIF) -> torch.Tensor:
    """Pre-reset membrane h = v - (v - v_reset)/tau + i (spikingjelly's LIFNode, decay_input=False)."""
    return v - (v - node.v_reset) / node.tau + i


def lif_fire(h: torch.Tensor, node: LIF) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes where h >= v_th and the hard-reset membrane: returns (spikes, new membrane)."""
    s = (h >= node.v_threshold).to(h.dtype)
    return s, h * (1.0 - s) + node.v_reset * s


def lif_step(i: torch.Tensor, v: torch.Tensor, node: LIF) -> tuple[torch.Tensor, torch.Tensor]:
    """One LIF step: returns (spikes, new membrane). Same arithmetic as spikingjelly's LIFNode."""
    return lif_fire(lif_charge(i, v, node), node)


def synapse_forward(
    node: Node, xs: list[torch.Tensor], params: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Stateless node applied to a batch `[B, ...]`.

    `params` = (weight, bias) tensors to use instead of the node's numpy arrays (a module that
    holds them once as buffers, so that traced/exported graphs share one copy across steps).
    """
    if isinstance(node, (Conv2d, Dense)):
        if params is None:
            w = torch.from_numpy(node.weight).to(xs[0].dtype)
            b = torch.from_numpy(node.bias).to(xs[0].dtype)
        else:
            w, b = params
        if isinstance(node, Dense):
            return F.linear(xs[0], w, b)
        return F.conv2d(xs[0], w, b, node.stride, node.padding, node.dilation, node.groups)
    if isinstance(node, AvgPool2d):
        return F.avg_pool2d(xs[0], node.kernel_size, node.stride, node.padding)
    if isinstance(node, Flatten):
        return xs[0].flatten(1)
    if isinstance(node, Add):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out
    raise GraphError(f"synapse_forward: unexpected node type {type(node).__name__}")


def init_state(g: DeployGraph, batch: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zero membrane per LIF layer, `[B, *shape]`."""
    return {n: torch.zeros((batch, *g.shapes[n]), dtype=dtype) for n in g.lif_names()}


def step_graph(
    g: DeployGraph,
    x: torch.Tensor,
    state: dict[str, torch.Tensor],
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One time step. `x` `[B, C, H, W]`; returns (every node's output, new state).

    `params` optionally maps Conv2d/Dense node names to (weight, bias) tensors (see
    `synapse_forward`).
    """
    vals: dict[str, torch.Tensor] = {}
    new_state: dict[str, torch.Tensor] = {}
    for name, node in g.nodes.items():
        if isinstance(node, Input):
            vals[name] = x
        elif isinstance(node, LIF):
            s, v = lif_step(vals[g.inputs[name][0]], state[name], node)
            vals[name], new_state[name] = s, v
        else:
            p = None if params is None else params.get(name)
            vals[name] = synapse_forward(node, [vals[i] for i in g.inputs[name]], p)
    return vals, new_state


@torch.no_grad()
def run_graph(g: DeployGraph, x: torch.Tensor) -> dict[str, Any]:
    """Run `x` `[T, B, C, H, W]` through the graph.

    Returns {"logits": [B, K] mean over steps, "step_logits": [T, B, K],
    "spikes": {lif_name: [T, B, *shape]}}.
    """
    if x.ndim != 5 or tuple(x.shape[2:]) != g.input_shape:
        raise GraphError(f"input must be [T, B, {', '.join(map(str, g.input_shape))}], got {tuple(x.shape)}")
    state = init_state(g, x.shape[1], x.dtype)
    outs, spikes = [], {n: [] for n in g.lif_names()}
    for t in range(x.shape[0]):
        vals, state = step_graph(g, x[t], state)
        outs.append(vals[g.output])
        for n in spikes:
            spikes[n].append(vals[n])
    step_logits = torch.stack(outs)
    return {
        "logits": step_logits.mean(0),
        "step_logits": step_logits,
        "spikes": {n: torch.stack(v) for n, v in spikes.items()},
    }


# ---------------------------------------------------------------- lowering


def fold_bn(weight: np.ndarray, bias: np.ndarray | None, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode BatchNorm into the preceding conv: exact up to float rounding."""
    w = weight.astype(np.float64)
    b = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)
    mean = bn.running_mean.detach().double().numpy()
    var = bn.running_var.detach().double().numpy()
    gamma = bn.weight.detach().double().numpy() if bn.affine else np.ones_like(mean)
    beta = bn.bias.detach().double().numpy() if bn.affine else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + bn.eps)
    w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    b = (b - mean) * scale + beta
    return w.astype(np.float32), b.astype(np.float32)


class _Builder:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.inputs: dict[str, tuple[str, ...]] = {}
        self.counts: dict[str, int] = {}

    def add(self, kind: str, node: Node, inputs: tuple[str, ...], name: str | None = None) -> str:
        """Append `node`, named `name` or `<kind><n>` (n counts that kind from 1)."""
        if name is None:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            name = f"{kind}{self.counts[kind]}"
        self.nodes[name] = node
        self.inputs[name] = inputs
        return name


def _conv_node(conv: nn.Conv2d, bn: nn.Module | None) -> Conv2d:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise GraphError(f"Conv2d with padding={conv.padding!r} padding_mode={conv.padding_mode!r} is not supported")
    w = conv.weight.detach().float().numpy()
    b = None if conv.bias is None else conv.bias.detach().float().numpy()
    if bn is not None:
        w, b = fold_bn(w, b, bn)
    elif b is None:
        b = np.zeros(w.shape[0], np.float32)
    return Conv2d(w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def _lower_seq(mods: list[nn.Module], b: _Builder, cur: str) -> str:
    from spikingjelly.activation_based import neuron as sj_neuron

    from tmkt.models import SpikingBasicBlock

    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv2d):
            bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d) else None
            cur = b.add("conv", _conv_node(m, bn), (cur,))
            i += 2 if bn is not None else 1
            continue
        if isinstance(m, nn.BatchNorm2d):
            raise GraphError("BatchNorm2d without a preceding Conv2d cannot be folded")
        if isinstance(m, sj_neuron.LIFNode):
            cur = b.add("lif", _lif_node(m), (cur,))
        elif isinstance(m, nn.AvgPool2d):
            if m.ceil_mode or not m.count_include_pad:
                raise GraphError("AvgPool2d with ceil_mode or count_include_pad=False is not supported")
            cur = b.add("pool", AvgPool2d(m.kernel_size, m.stride or m.kernel_size, m.padding), (cur,))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if as_pair(m.output_size) != (1, 1):
                raise GraphError("only AdaptiveAvgPool2d(1) (global average pooling) is supported")
            # kernel = the incoming map; filled in after shapes are known (see lower()).
            cur = b.add("pool", AvgPool2d((0, 0), (0, 0)), (cur,))
        elif isinstance(m, nn.Flatten):
            cur = b.add("flatten", Flatten(), (cur,))
        elif isinstance(m, SpikingBasicBlock):
            x_in = cur
            h = b.add("conv", _conv_node(m.conv1, m.bn1), (x_in,))
            h = b.add("lif", _lif_node(m.lif1), (h,))
            h = b.add("conv", _conv_node(m.conv2, m.bn2), (h,))
            if len(m.shortcut) == 0:
                sc = x_in
            else:
                sc = b.add("conv", _conv_node(m.shortcut[0], m.shortcut[1]), (x_in,))
            h = b.add("add", Add(), (h, sc))
            cur = b.add("lif", _lif_node(m.lif2), (h,))
        elif isinstance(m, nn.MaxPool2d):
            raise GraphError("MaxPool2d is not supported by the deploy graph (use average pooling)")
        else:
            raise GraphError(f"layer {type(m).__name__} is not supported by the deploy graph")
        i += 1
    return cur


def _lif_node(m: nn.Module) -> LIF:
    if getattr(m, "v_reset", None) is None:
        raise GraphError("LIF with soft reset (v_reset=None) is not supported: the deploy contract is a hard reset to 0")
    if getattr(m, "decay_input", False):
        raise GraphError("LIF with decay_input=True is not supported: the deploy contract is decay_input=False")
    return LIF(tau=float(m.tau), v_threshold=float(m.v_threshold), v_reset=float(m.v_reset))


def _resolve_global_pools(b: _Builder) -> None:
    """Give AdaptiveAvgPool2d(1) placeholders a kernel equal to their input map."""
    names = list(b.nodes)
    for k, name in enumerate(names):
        node = b.nodes[name]
        if isinstance(node, AvgPool2d) and node.kernel_size == (0, 0):
            prefix = names[:k]
            src = b.inputs[name][0]
            part = DeployGraph({n: b.nodes[n] for n in prefix}, {n: b.inputs[n] for n in prefix}, output=src)
            _, h, w = part.shapes[src]
            node.kernel_size = node.stride = (h, w)


def lower(model: nn.Module, meta: dict[str, Any] | None = None) -> DeployGraph:
    """Lower a `tmkt.models.SpikingNet` (eval mode is set) to a DeployGraph with the event head."""
    from tmkt.models import SpikingNet

    if not isinstance(model, SpikingNet):
        raise GraphError(f"lower() takes a tmkt SpikingNet, got {type(model).__name__}")
    model.eval()
    cfg = model.cfg
    shape = (cfg.in_channels, *cfg.input_size)
    b = _Builder()
    cur = b.add("input", Input(shape), ())
    cur = _lower_seq(list(model.trunk), b, cur)
    head = model.event_head
    b.add("dense", Dense(head.weight.detach().float().numpy(), head.bias.detach().float().numpy()), (cur,), name="head")
    _resolve_global_pools(b)
    return DeployGraph(b.nodes, b.inputs, output="head", meta=dict(meta or {}))


def lower_run(run: Any) -> DeployGraph:
    """Lower a loaded `tmkt.checkpoint.Run`, carrying its metadata."""
    data = run.config["data"]
    n = run.model.cfg.neuron
    meta = {
        "timesteps": int(data["timesteps"]),
        "input_shape": [run.model.cfg.in_channels, *run.model.cfg.input_size],
        "sensor_size": list(data["sensor_size"]),
        "binning": {"resize": "frames", **data["binning"]},  # runs from before "resize" resized frames
        "class_names": list(data["class_names"]),
        "dataset": data["name"],
        "neuron": {"tau": n.tau, "v_threshold": n.v_threshold, "v_reset": n.v_reset},
        "backbone": run.model.cfg.backbone,
        "method": run.config["method"]["name"],
        "tmkt_version": run.config["versions"]["tmkt"],
    }
    return lower(run.model, meta)
