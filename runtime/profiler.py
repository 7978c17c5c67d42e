"""Spike, sparsity and synaptic-operation profile of a deploy graph on real samples.

`profile_graph(graph, frames)` runs the graph's own step function (`tmkt.export.graph.step_graph`)
and counts, per layer and summed over samples and time steps:

- LIF layers: neurons, spikes, neuron updates (every neuron, every step);
- synaptic layers (Conv2d, Dense, and the identity input of an Add that adds spikes to currents):
  Dense  = connections of one dense pass (padding excluded, as NeuroBench counts them) x T,
  effective ops = sum over non-zero inputs of their real fan-out, exact at borders, strides,
  padding, dilation and groups; the ops are ACs (accumulates) when every counted input was 0 or 1
  and MACs otherwise (a first layer fed event-count frames).

Names follow NeuroBench: SynapticOperations {Dense, Effective_ACs, Effective_MACs} and
ActivationSparsity (share of zero outputs over all LIF neurons and steps).

Pooled spikes (`pooled_inputs`): the deploy graph averages spikes before the next synaptic layer,
so that layer sees values in {0, 1/k, ...}. In "fold" mode (default) a non-overlapping, unpadded
AvgPool2d (and any Flatten) is folded into the synaptic layer: avgpool then conv equals one conv
on the spikes themselves (kernel upsampled by the pool and divided by its area, stride and
padding multiplied by the pool stride), so each spike costs one AC per output it reaches and the
count stays in ACs. In "mac" mode the pooled values are counted as they are: non-zero pooled
inputs x fan-out, as MACs (what NeuroBench reports). See docs/hw-profiles.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F

from tmkt.export.graph import (
    Add,
    AvgPool2d,
    Conv2d,
    Dense,
    DeployGraph,
    Flatten,
    GraphError,
    init_state,
    step_graph,
)

POOLED_MODES = ("fold", "mac")

__all__ = [
    "POOLED_MODES",
    "NeuronLayer",
    "Profile",
    "SynapticLayer",
    "fanout_map",
    "profile_batches",
    "profile_graph",
    "synaptic_plan",
]


@dataclass(frozen=True)
class SynapticLayer:
    """Counts of one synaptic layer, summed over all profiled samples and steps.

    name: the synaptic node, or "<add>.<source>" for an identity (shortcut) input of an Add.
    op: "Conv2d" | "Dense" | "Identity".
    source: node whose values are counted (a LIF, the Input, or the layer's own input).
    folded: AvgPool2d / Flatten nodes between `source` and the layer, folded into the fan-out.
    dense_per_step: connections of one dense pass on the layer's own input, per sample.
    inputs_per_step: elements of `source` per sample and step.
    binary: every counted value was 0 or 1 (ops are ACs); otherwise they are MACs.
    nonzero: non-zero counted inputs (total). ops: effective synaptic operations (total).
    """

    name: str
    op: str
    source: str
    folded: tuple[str, ...]
    dense_per_step: int
    inputs_per_step: int
    binary: bool
    nonzero: int
    ops: int

    @property
    def counted_as(self) -> str:
        return "AC" if self.binary else "MAC"


@dataclass(frozen=True)
class NeuronLayer:
    """One LIF layer: `neurons` per sample, `spikes` summed over all samples and steps."""

    name: str
    neurons: int
    spikes: int


Layer = Union[SynapticLayer, NeuronLayer]


@dataclass(frozen=True)
class Profile:
    """What `profile_graph` measured. Totals are over `samples` x `timesteps`; the `*_per_inference`
    helpers divide by `samples` (one inference = one sample over all T steps)."""

    layers: tuple[Layer, ...]  # graph order
    samples: int
    timesteps: int
    pooled_inputs: str
    correct: int | None = None  # correct predictions (mean logits over T), when labels were given

    @property
    def synaptic(self) -> tuple[SynapticLayer, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, SynapticLayer))

    @property
    def neuron(self) -> tuple[NeuronLayer, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, NeuronLayer))

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.samples

    def firing_rate(self, layer: NeuronLayer) -> float:
        """Spikes per neuron per step."""
        return layer.spikes / (layer.neurons * self.timesteps * self.samples)

    def per_inference(self, total: float) -> float:
        return total / self.samples

    def totals(self) -> dict[str, Any]:
        """Per-inference totals (NeuroBench names where they exist)."""
        neurons = sum(n.neurons for n in self.neuron)
        spikes = sum(n.spikes for n in self.neuron)
        steps = neurons * self.timesteps * self.samples
        acs = sum(s.ops for s in self.synaptic if s.binary)
        macs = sum(s.ops for s in self.synaptic if not s.binary)
        dense = sum(s.dense_per_step for s in self.synaptic)
        return {
            "neurons": neurons,
            "spikes": self.per_inference(spikes),
            "neuron_updates": neurons * self.timesteps,
            "firing_rate": spikes / steps if steps else 0.0,
            "activation_sparsity": 1.0 - spikes / steps if steps else 1.0,
            "dense_per_pass": dense,
            "synaptic_operations": {
                "Dense": dense * self.timesteps,
                "Effective_ACs": self.per_inference(acs),
                "Effective_MACs": self.per_inference(macs),
            },
        }


# ---------------------------------------------------------------- fan-out


def _foldable(node: Any) -> bool:
    # Only a non-overlapping, unpadded pool maps each spike to exactly one pooled cell, so the
    # summed path counts below equal distinct connections of the folded layer.
    if isinstance(node, Flatten):
        return True
    return isinstance(node, AvgPool2d) and node.kernel_size == node.stride and node.padding == (0, 0)


def fanout_map(g: DeployGraph, chain: tuple[str, ...], target: str | None, source_shape: tuple[int, ...]) -> torch.Tensor:
    """Structural fan-out of every element of `source_shape`: the number of outputs of `target`
    it reaches through the nodes `chain` (AvgPool2d / Flatten, in order) and then `target`
    (Conv2d / Dense; None for an identity input). int64 tensor of `source_shape`.

    Computed as the gradient of the summed output of the same ops with all-ones weights (pools
    as sum-pools): exact at borders, strides, padding, dilation and groups, because each path
    contributes exactly 1.
    """
    x = torch.zeros((1, *source_shape), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        h = x
        for name in chain:
            node = g.nodes[name]
            if isinstance(node, AvgPool2d):
                kh, kw = node.kernel_size
                h = F.avg_pool2d(h, node.kernel_size, node.stride, node.padding) * (kh * kw)
            elif isinstance(node, Flatten):
                h = h.flatten(1)
            else:
                raise GraphError(f"node {name!r}: cannot fold a {type(node).__name__} into a fan-out")
        if target is not None:
            node = g.nodes[target]
            if isinstance(node, Conv2d):
                ones = torch.ones(node.weight.shape, dtype=torch.float64)
                h = F.conv2d(h, ones, None, node.stride, node.padding, node.dilation, node.groups)
            elif isinstance(node, Dense):
                h = F.linear(h, torch.ones(node.weight.shape, dtype=torch.float64))
            else:
                raise GraphError(f"node {target!r}: {type(node).__name__} is not a synaptic layer")
        h.sum().backward()
    return x.grad[0].round().to(torch.int64)


@dataclass(frozen=True)
class _Plan:
    name: str
    op: str
    source: str
    folded: tuple[str, ...]
    fanout: torch.Tensor  # int64, shape of source
    dense_per_step: int


def _walk_up(g: DeployGraph, start: str) -> tuple[str, tuple[str, ...]]:
    """From `start` up through AvgPool2d / Flatten nodes: (first other node, chain in data order)."""
    chain: list[str] = []
    cur = start
    while isinstance(g.nodes[cur], (AvgPool2d, Flatten)):
        chain.insert(0, cur)
        cur = g.inputs[cur][0]
    return cur, tuple(chain)


def _counting_point(g: DeployGraph, immediate: str, pooled_inputs: str) -> tuple[str, tuple[str, ...]]:
    src, chain = _walk_up(g, immediate)
    has_pool = any(isinstance(g.nodes[c], AvgPool2d) for c in chain)
    if pooled_inputs == "fold" and all(_foldable(g.nodes[c]) for c in chain):
        return src, chain
    if has_pool:  # "mac" mode, or a pool that cannot be folded: count what the layer receives
        return immediate, ()
    return src, chain  # Flatten only: a reshape, the same values either way


def synaptic_plan(g: DeployGraph, pooled_inputs: str = "fold") -> list[_Plan]:
    """Which values each synaptic layer counts and their fan-out maps (graph order)."""
    if pooled_inputs not in POOLED_MODES:
        raise ValueError(f"pooled_inputs must be one of {POOLED_MODES}, got {pooled_inputs!r}")
    plans: list[_Plan] = []
    for name, node in g.nodes.items():
        if isinstance(node, (Conv2d, Dense)):
            immediate = g.inputs[name][0]
            src, chain = _counting_point(g, immediate, pooled_inputs)
            fan = fanout_map(g, chain, name, g.shapes[src])
            dense = int(fanout_map(g, (), name, g.shapes[immediate]).sum())
            plans.append(_Plan(name, type(node).__name__, src, chain, fan, dense))
        elif isinstance(node, Add):
            for inp in g.inputs[name]:
                origin, _ = _walk_up(g, inp)
                if isinstance(g.nodes[origin], (Conv2d, Dense, Add)):
                    continue  # currents summed into the same neurons: no operation of their own
                # spikes (or frames) added one-to-one to currents: an identity synapse
                src, chain = _counting_point(g, inp, pooled_inputs)
                fan = fanout_map(g, chain, None, g.shapes[src])
                dense = int(torch.tensor(g.shapes[name]).prod())
                plans.append(_Plan(f"{name}.{inp}", "Identity", src, chain, fan, dense))
    return plans


# ---------------------------------------------------------------- running


def _as_batch(item: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        return item, None
    frames, labels = item
    return torch.as_tensor(frames), None if labels is None else torch.as_tensor(labels)


@torch.no_grad()
def profile_batches(
    g: DeployGraph,
    batches: Iterable[Any],
    *,
    pooled_inputs: str = "fold",
    on_batch: Callable[[int], None] | None = None,
) -> Profile:
    """Profile over batches of `frames [T, B, C, H, W]` or `(frames, labels [B])` pairs.

    `on_batch(n)` is called after each batch with its sample count (for progress bars).
    """
    plans = synaptic_plan(g, pooled_inputs)
    lifs = g.lif_names()
    nonzero = {p.name: 0 for p in plans}
    ops = {p.name: 0 for p in plans}
    binary = {p.name: True for p in plans}
    spikes = {n: 0 for n in lifs}
    samples, timesteps, correct, labelled = 0, None, 0, True
    for item in batches:
        x, labels = _as_batch(item)
        if x.ndim != 5 or tuple(x.shape[2:]) != g.input_shape:
            raise GraphError(f"frames must be [T, B, {', '.join(map(str, g.input_shape))}], got {tuple(x.shape)}")
        if timesteps is None:
            timesteps = x.shape[0]
        elif x.shape[0] != timesteps:
            raise GraphError(f"all batches need the same number of steps: {timesteps} then {x.shape[0]}")
        x = x.to(torch.float32)
        state = init_state(g, x.shape[1])
        logits = 0.0
        for t in range(x.shape[0]):
            vals, state = step_graph(g, x[t], state)
            for p in plans:
                v = vals[p.source]
                nz = v != 0
                nonzero[p.name] += int(nz.sum())
                ops[p.name] += int((nz.to(torch.int64) * p.fanout).sum())
                if binary[p.name] and not bool(((v == 0) | (v == 1)).all()):
                    binary[p.name] = False
            for n in lifs:
                spikes[n] += int(vals[n].sum())
            logits = logits + vals[g.output]
        if labels is None:
            labelled = False
        else:
            correct += int((torch.as_tensor(logits).argmax(-1) == labels.to(torch.int64)).sum())
        samples += x.shape[1]
        if on_batch is not None:
            on_batch(x.shape[1])
    if samples == 0 or timesteps is None:
        raise ValueError("no samples to profile")
    by_name: dict[str, Layer] = {}
    for p in plans:
        by_name[p.name] = SynapticLayer(
            name=p.name,
            op=p.op,
            source=p.source,
            folded=p.folded,
            dense_per_step=p.dense_per_step,
            inputs_per_step=int(p.fanout.numel()),
            binary=binary[p.name],
            nonzero=nonzero[p.name],
            ops=ops[p.name],
        )
    for n in lifs:
        by_name[n] = NeuronLayer(n, int(torch.tensor(g.shapes[n]).prod()), spikes[n])
    order: list[Layer] = []
    for name in g.nodes:  # graph order; identity rows sit right before their Add's LIF
        order += [layer for key, layer in by_name.items() if key == name or key.startswith(f"{name}.")]
    return Profile(tuple(order), samples, int(timesteps), pooled_inputs, correct if labelled else None)


def profile_graph(
    g: DeployGraph,
    frames: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    pooled_inputs: str = "fold",
) -> Profile:
    """Profile one batch `frames [T, B, C, H, W]` (optional `labels [B]` for accuracy)."""
    return profile_batches(g, [(frames, labels)], pooled_inputs=pooled_inputs)
