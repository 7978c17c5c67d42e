"""Residual networks in the Loihi export's fixed point: neuron groups, their quantization and
their bit-accurate integer simulation. The int8 ONNX export (`tmkt.export.onnx_int8`) runs them.

netx (and so the chip export) takes only a chain of layers; a residual block adds the currents of
two synapses (or of a synapse and the block's input spikes) into one LIF. Here every LIF node
becomes a *group*: the synapses whose currents it sums, each reading a spike source (the input
or an earlier LIF), pooling folded as for netx (`quantize.fold_pool_into_conv/dense`), an
identity shortcut as a 1x1 convolution with weight 1. A group is quantized with the netx rules
in one piece (`quantize.quantize_layer` on its synapses side by side: one scale for all of them,
8-bit even weights, 13-bit bias, the worst-case current of the *sum* under 2^17, vThMant), so a
chain's groups are exactly the netx layers. The readout is `quantize.quantize_readout`, its
range calibrated on the spikes the groups below send it.

`simulate_groups` is the reference: each synapse's current as lava's fixed-point models compute
it (`netx_sim.layer_current`), summed, plus the bias, through `netx_sim.run_cuba`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tmkt.export.graph import LIF, Add, AvgPool2d, Conv2d, Dense, DeployGraph, Flatten, Input
from tmkt.export.netx_sim import layer_current, run_cuba, sample_chunk
from tmkt.export.quantize import (
    FloatLayer,
    LavaExportError,
    QLayer,
    _float_layer,
    _Synapse,
    fold_pool_into_conv,
    fold_pool_into_dense,
    quantize_layer,
    quantize_readout,
)


class GroupError(LavaExportError):
    """A residual graph the integer export cannot take; the message names the node."""


@dataclass(eq=False)
class QGroup:
    """One LIF (or the readout) and the quantized synapses feeding it, each with its spike source.

    `layers[i]` reads the spikes of node `sources[i]`; all share one scale and neuron; the
    group's bias is the sum of the layers' (the first holds it, the others are zero)."""

    name: str
    sources: list[str]
    layers: list[QLayer]

    @property
    def readout(self) -> bool:
        return self.layers[0].readout


@dataclass(eq=False)
class GroupNet:
    """A quantized network of neuron groups in topological order; the last group is the readout."""

    input_name: str
    input_shape: tuple[int, int, int]
    groups: list[QGroup]
    meta: dict[str, Any] = field(default_factory=dict)


def _spike_source(g: DeployGraph, synapse: str) -> tuple[str, list[tuple[str, Any]]]:
    """The spike source (Input or LIF) feeding `synapse` and the pool/flatten nodes in between."""
    between: list[tuple[str, Any]] = []
    src = g.inputs[synapse][0]
    while isinstance(g.nodes[src], (AvgPool2d, Flatten)):
        between.insert(0, (src, g.nodes[src]))
        src = g.inputs[src][0]
    if not isinstance(g.nodes[src], (Input, LIF)):
        raise GroupError(f"layer {synapse!r} reads {src!r} ({type(g.nodes[src]).__name__}), not spikes: "
                         "every synaptic layer of the integer network must receive binary spikes")
    return src, between


def _branch(g: DeployGraph, synapse: str, lif: LIF | None, group: str) -> tuple[str, FloatLayer]:
    """One synapse of a group as a FloatLayer over its spike source (pooling folded)."""
    node = g.nodes[synapse]
    src, between = _spike_source(g, synapse)
    kinds = [type(n).__name__ for _, n in between]
    allowed = [[], ["AvgPool2d"]] if isinstance(node, Conv2d) else [[], ["Flatten"], ["AvgPool2d", "Flatten"]]
    if kinds not in allowed:
        raise GroupError(f"layer {synapse!r}: {' -> '.join(kinds)} before it cannot be folded "
                         "(supported: AvgPool2d -> Conv2d, [AvgPool2d ->] Flatten -> Dense)")
    cur, shape = node, g.shapes[src]
    if kinds and kinds[0] == "AvgPool2d":
        pname, pool = between[0]
        cur = fold_pool_into_conv(pool, node, shape, pname) if isinstance(node, Conv2d) else fold_pool_into_dense(pool, node, shape)
    flatten = bool(kinds) and kinds[-1] == "Flatten"
    return src, _float_layer(_Synapse(synapse, cur, shape, flatten), f"{synapse}+{group}", lif)


def _identity(g: DeployGraph, src: str, lif: LIF, group: str) -> tuple[str, FloatLayer]:
    """A shortcut adding spikes of `src` unchanged: a 1x1 convolution with weight 1."""
    shape = g.shapes[src]
    if len(shape) != 3:
        raise GroupError(f"node {group!r}: identity shortcut from {src!r} needs a (C, H, W) map, got {shape}")
    eye = np.eye(shape[0])[:, :, None, None]
    return src, _float_layer(_Synapse(f"{src}_identity", Conv2d(eye, np.zeros(shape[0])), shape, False),
                             f"{src}_identity+{group}", lif)


def fold_groups(g: DeployGraph) -> list[tuple[str, list[tuple[str, FloatLayer]]]]:
    """Every LIF of `g` (topological order) with its (source, FloatLayer) synapses, then the
    readout (the graph output, a Dense head). Raises GroupError naming a node it cannot take."""
    groups = []
    for name, node in g.nodes.items():
        if not isinstance(node, LIF):
            continue
        if node.v_reset != 0.0:
            raise GroupError(f"layer {name!r}: v_reset={node.v_reset}; the integer neuron resets to 0")
        (src,) = g.inputs[name]
        feeds = list(g.inputs[src]) if isinstance(g.nodes[src], Add) else [src]
        branches = []
        for f in feeds:
            if isinstance(g.nodes[f], (Conv2d, Dense)):
                branches.append(_branch(g, f, node, name))
            elif isinstance(g.nodes[f], (LIF, Input)) and isinstance(g.nodes[src], Add):
                branches.append(_identity(g, f, node, name))
            else:
                raise GroupError(f"layer {name!r} (LIF) is fed by {f!r} ({type(g.nodes[f]).__name__}); "
                                 "a neuron takes synaptic currents (conv, dense, or their sum)")
        groups.append((name, branches))
    head = g.nodes[g.output]
    if not isinstance(head, Dense):
        raise GroupError(f"graph output {g.output!r} must be a Dense head, got {type(head).__name__}")
    groups.append((g.output, [_branch(g, g.output, None, g.output)]))
    return groups


def quantize_group(name: str, branches: list[FloatLayer]) -> list[QLayer]:
    """The synapses of one neuron at one scale: `quantize_layer` on them side by side (so the
    scale, bias and worst-case-current rules apply to the summed current); returns one QLayer
    per synapse, the group's bias in the first."""
    o = branches[0].weight.shape[0]
    merged = FloatLayer(
        name=name, kind="dense", weight=np.concatenate([b.weight.reshape(o, -1) for b in branches], axis=1),
        bias=np.sum([b.bias for b in branches], axis=0), in_shape=(sum(b.weight[0].size for b in branches),),
        out_shape=(o,), lif=branches[0].lif,
    )
    q = quantize_layer(merged)
    out, col = [], 0
    for k, b in enumerate(branches):
        n = b.weight[0].size
        out.append(QLayer(
            name=b.name, kind=b.kind, weight=q.weight[:, col:col + n].reshape(b.weight.shape).copy(),
            bias=q.bias if k == 0 else np.zeros_like(q.bias), in_shape=b.in_shape, out_shape=b.out_shape,
            geometry=b.geometry, flatten=b.flatten, neuron=q.neuron, scale=q.scale, readout=False,
        ))
        col += n
    return out


def _group_current(group: QGroup, vals: dict[str, np.ndarray], t: int, b: int) -> np.ndarray:
    """Summed integer current of a group, bias included, `[T, B, *out_shape]` (int64)."""
    total = None
    for src, q in zip(group.sources, group.layers):
        x = vals[src]
        a = layer_current(q, x.reshape(t * b, *x.shape[2:])).reshape(t, b, *q.out_shape)
        total = a if total is None else total + a
    bias = np.sum([q.bias.astype(np.int64) for q in group.layers], axis=0)
    return total + bias.reshape(-1, *([1] * (len(group.layers[0].out_shape) - 1)))  # type: ignore[operator]


def simulate_groups(net: GroupNet, spikes: np.ndarray, stop_before_readout: bool = False) -> dict[str, Any]:
    """Run binary `spikes` `[T, B, C, H, W]` through `net`, every group on all T frames at once.

    Returns {"spikes": {group name: uint8 `[T, B, *shape]`}, "readout_current": `[T, B, K]`
    (int64, per step, bias included; absent with `stop_before_readout`)}."""
    x = np.asarray(spikes)
    t, b = x.shape[:2]
    step = sample_chunk(t, [tuple(x.shape[2:])] + [tuple(q.out_shape) for grp in net.groups for q in grp.layers])
    if b > step:  # samples are independent: bounded memory for a large batch (calibration)
        parts = [simulate_groups(net, x[:, i:i + step], stop_before_readout) for i in range(0, b, step)]
        merged: dict[str, Any] = {key: {name: np.concatenate([p[key][name] for p in parts], axis=1) for name in parts[0][key]}
                                  for key in ("spikes", "vals")}
        if not stop_before_readout:
            merged["readout_current"] = np.concatenate([p["readout_current"] for p in parts], axis=1)
        return merged
    vals = {net.input_name: (x > 0).astype(np.uint8)}
    out: dict[str, Any] = {"spikes": {}}
    for group in net.groups:
        if group.readout:
            if not stop_before_readout:
                out["readout_current"] = _group_current(group, vals, t, b)
            break
        a = _group_current(group, vals, t, b)
        n = group.layers[0].neuron
        # run_cuba adds the bias itself; the summed current already holds it
        s, _ = run_cuba(a, np.zeros(1, np.int64), n.i_decay, n.v_decay, n.v_th_mant)
        vals[group.name] = out["spikes"][group.name] = s
    out["vals"] = vals
    return out


def quantize_residual(g: DeployGraph, calibration: np.ndarray | None = None) -> GroupNet:
    """Deploy graph (residual allowed) -> GroupNet with the netx rules per group and a readout
    that stays in range for T steps (calibrated on `calibration` spikes `[T, N, C, H, W]`, as
    `quantize.quantize_graph`)."""
    folded = fold_groups(g)
    groups = [QGroup(name, [s for s, _ in br], quantize_group(name, [f for _, f in br])) for name, br in folded[:-1]]
    head_name, ((head_src, head),) = folded[-1]
    timesteps = int(g.meta.get("timesteps", 1))
    inputs = None
    net = GroupNet(g.input_name, tuple(g.input_shape), groups, dict(g.meta))  # type: ignore[arg-type]
    if calibration is not None:
        vals = simulate_groups(net, np.asarray(calibration), stop_before_readout=True)["vals"]
        src = vals[head_src]
        inputs = src.reshape(*src.shape[:2], -1)
        timesteps = max(timesteps, inputs.shape[0])
    readout, figures = quantize_readout(head, timesteps, inputs)
    net.groups.append(QGroup(head_name, [head_src], [readout]))
    net.meta["readout_range"] = figures
    return net
