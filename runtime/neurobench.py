"""NeuroBench's own harness on a tmkt network, and its figures beside tmkt's profiler.

`run_neurobench(model, frames, labels)` wraps the trained spikingjelly network for NeuroBench
2.3 (`neurobench.models.TorchModel` around `EventHeadNet`: the trunk and the event head only,
batch-first as NeuroBench feeds it, neuron state reset before every batch, spikingjelly neurons
registered as activation modules) and runs its `Benchmark` with the static metrics Footprint,
ConnectionSparsity, ParameterCount and the workload metrics ActivationSparsity,
SynapticOperations (Effective_MACs, Effective_ACs, Dense) and ClassificationAccuracy.

`compare(nb, profile_mac, profile_fold, graph, nb_folded=...)` sets those numbers beside tmkt's
own (`tmkt.runtime.profiler`): where the definitions coincide they must be equal (tmkt's "mac"
mode counts pooled spikes exactly as NeuroBench does). NeuroBench runs the trained network
(BatchNorm after each conv), tmkt the deploy graph (BatchNorm folded), and float32 rounding can
move a few membranes across the threshold; NeuroBench on `fold_batchnorm(model)` runs the
deployed arithmetic and gives tmkt's numbers exactly. Every row where they differ says why.

What NeuroBench cannot measure on a spikingjelly neuron: MembraneUpdates and NeuronOperations
read snnTorch's `mem` attribute and `_reset_mechanism` (the latter only for snnTorch's neuron
classes), which a spikingjelly `LIFNode` does not have; NeuroBench would report 0 (or catch its
own AttributeError and report 0.0). They are listed in `NOT_MEASURED`, not run; tmkt's
`neuron_updates` (every neuron, every step) stands alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tmkt.errors import TmktError

STATIC_METRICS = ("Footprint", "ConnectionSparsity", "ParameterCount")
WORKLOAD_METRICS = ("ActivationSparsity", "SynapticOperations", "ClassificationAccuracy")
NOT_MEASURED = {
    "MembraneUpdates": "reads snnTorch's `mem` attribute, which spikingjelly neurons do not have (NeuroBench would report 0)",
    "NeuronOperations": "needs an snnTorch neuron class and its `_reset_mechanism` (NeuroBench catches the error and reports 0.0)",
}

__all__ = ["NOT_MEASURED", "STATIC_METRICS", "WORKLOAD_METRICS", "EventHeadNet", "NeuroBenchError",
           "compare", "deploy_parameters", "fold_batchnorm", "run_neurobench"]


class NeuroBenchError(TmktError, RuntimeError):
    """NeuroBench is not installed or cannot run this network."""


class EventHeadNet(nn.Module):
    """The trunk and event head of a `tmkt.models.SpikingNet`, as NeuroBench calls a network.

    forward: frames `[B, T, C, H, W]` (NeuroBench's batch-first layout) -> mean logits `[B, K]`.
    The modules are the model's own (not copies). Neuron state is reset before every batch, so
    each batch starts from rest as in training and in `tmkt profile`. The other heads (mixed,
    MAG, MRP) are left out: they are not deployed, and NeuroBench's static metrics would count them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from spikingjelly.activation_based import base

        self.trunk = model.trunk
        self.head = model.event_head
        self._stateful = tuple(m for m in self.trunk.modules() if isinstance(m, base.MemoryModule))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._stateful:
            m.reset()
        logits = self.head(self.trunk(x.transpose(0, 1)))  # [T, B, K]
        for m in self._stateful:
            m.reset()
        return logits.mean(0)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with every BatchNorm2d folded into the conv before it (`fold_bn`, as the
    deploy graph does) and replaced by Identity: the network tmkt profiles and exports, in
    spikingjelly modules that NeuroBench can hook."""
    import copy

    from tmkt.export.graph import fold_bn

    folded = copy.deepcopy(model)

    def walk(mod: nn.Module) -> None:
        kids = list(mod.named_children())
        for (_, conv), (name, bn) in zip(kids, kids[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                bias = None if conv.bias is None else conv.bias.detach().numpy()
                w, b = fold_bn(conv.weight.detach().numpy(), bias, bn)
                conv.weight = nn.Parameter(torch.from_numpy(w))
                conv.bias = nn.Parameter(torch.from_numpy(b))
                setattr(mod, name, nn.Identity())
        for _, child in mod.named_children():
            walk(child)

    walk(folded)
    return folded.eval()


def _import_neurobench():
    try:
        from neurobench.benchmarks import Benchmark
        from neurobench.metrics import static, workload
        from neurobench.models import TorchModel
    except ImportError as e:
        raise NeuroBenchError(
            f"NeuroBench is not installed ({e}); install it with `pip install 'tmkt[neurobench]'` (neurobench==2.3.0)"
        ) from None
    return Benchmark, TorchModel, static, workload


@torch.no_grad()
def run_neurobench(
    model: nn.Module,
    frames: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None,
    *,
    batch_size: int = 16,
    batchnorm_folded: bool = False,
) -> dict[str, Any]:
    """NeuroBench's Benchmark on `model` (a SpikingNet) over `frames [N, T, C, H, W]`; with
    `batchnorm_folded` on `fold_batchnorm(model)`, the deployed arithmetic.

    Returns NeuroBench's results dict: Footprint (bytes), ConnectionSparsity, ParameterCount,
    ActivationSparsity, SynapticOperations {Effective_MACs, Effective_ACs, Dense} (per sample),
    and ClassificationAccuracy when `labels [N]` are given.
    """
    from spikingjelly.activation_based.neuron import BaseNode
    from torch.utils.data import DataLoader, TensorDataset

    Benchmark, TorchModel, static, workload = _import_neurobench()
    x = torch.as_tensor(np.asarray(frames, dtype=np.float32))
    if x.ndim != 5:
        raise NeuroBenchError(f"frames must be [N, T, C, H, W], got shape {tuple(x.shape)}")
    y = torch.full((len(x),), -1, dtype=torch.int64) if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    net = EventHeadNet(fold_batchnorm(model) if batchnorm_folded else model).eval()
    wrapped = TorchModel(net)
    wrapped.add_activation_module(BaseNode)  # every spikingjelly neuron is an activation layer
    metrics = [m for m in WORKLOAD_METRICS if labels is not None or m != "ClassificationAccuracy"]
    bench = Benchmark(
        wrapped,
        DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False),
        [],
        [lambda logits: logits.argmax(-1)],
        [[getattr(static, m) for m in STATIC_METRICS], [getattr(workload, m) for m in metrics]],
    )
    if not wrapped.activation_layers():
        raise NeuroBenchError("NeuroBench found no spiking neuron in the network")
    try:
        return dict(bench.run(quiet=True))
    finally:
        wrapped.cleanup_hooks()


def deploy_parameters(graph) -> int:
    """Weights and biases of the deploy graph's synaptic layers (BatchNorm folded in)."""
    from tmkt.export.graph import Conv2d, Dense

    return int(sum(n.weight.size + n.bias.size for n in graph.nodes.values() if isinstance(n, (Conv2d, Dense))))


@dataclass(frozen=True)
class Row:
    """One metric: NeuroBench's value, tmkt's, whether they agree, and why not where they differ."""

    metric: str
    neurobench: float | None
    tmkt: float | None
    equal: bool | None  # None: not comparable (different definitions, or one side does not measure it)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "neurobench": self.neurobench, "tmkt": self.tmkt, "equal": self.equal, "note": self.note}


def _same(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


def _spikes(sparsity: float, p) -> float:
    """Spikes over all samples implied by an activation sparsity of profile `p`'s network."""
    return (1.0 - sparsity) * sum(n.neurons for n in p.neuron) * p.timesteps * p.samples


def compare(nb: dict[str, Any], profile_mac, profile_fold, graph, model: nn.Module | None = None,
            nb_folded: dict[str, Any] | None = None) -> list[Row]:
    """NeuroBench's results beside tmkt's profiles of the same samples ("mac" and "fold" modes).

    `nb`: NeuroBench on the trained network; `nb_folded`: on the same network with BatchNorm
    folded (`run_neurobench(..., batchnorm_folded=True)`), the arithmetic of the deploy graph that
    tmkt profiles. Equal by definition, checked here: ActivationSparsity, Dense, Effective_ACs and
    Effective_MACs against the "mac" profile, and accuracy; for the folded network exactly, for
    the trained one up to the spikes that float rounding of the unfolded BatchNorm moves across the
    threshold (counted in the note). Explained with numbers: the "fold" counts (pooled spikes
    counted per spike), identity shortcuts (NeuroBench counts no synaptic operation for them),
    parameters (NeuroBench counts BatchNorm separately), and the neuron metrics NeuroBench cannot
    take from spikingjelly neurons.
    """
    rows: list[Row] = []
    tm, tf = profile_mac.totals(), profile_fold.totals()
    so_m, so_f = tm["synaptic_operations"], tf["synaptic_operations"]
    identity = [s for s in profile_mac.synaptic if s.op == "Identity"]
    id_ops = sum(s.ops for s in identity) / profile_mac.samples
    id_dense = sum(s.dense_per_step for s in identity) * profile_mac.timesteps
    id_note = (f"; tmkt adds {id_ops:.6g} ACs ({id_dense} dense) for identity shortcuts, which NeuroBench does not count"
               if identity else "")
    first = profile_mac.synaptic[0] if profile_mac.synaptic else None
    first_note = ""
    if first is not None:
        first_note = (f"; first layer {first.name} on {'binary' if first.binary else 'non-binary (event-count or resized)'} "
                      f"frames: {first.ops / profile_mac.samples:.6g} {first.counted_as}s in both")
    t_spikes = sum(n.spikes for n in profile_mac.neuron)

    def rows_for(res: dict[str, Any], tag: str) -> None:
        so = res["SynapticOperations"]
        drift = ""
        if tag == "" and nb_folded is not None:
            d = _spikes(float(res["ActivationSparsity"]), profile_mac) - t_spikes
            if abs(d) > 0.5:
                drift = (f"; the trained network (BatchNorm after each conv) fires {d:+.0f} spikes of {t_spikes:,} "
                         "against the deploy graph (BatchNorm folded): float32 rounding across the threshold; "
                         "see the [BN folded] row")

        def row(metric, nbv, tv, note, offset=0.0, rel=1e-9):
            same = _same(nbv + offset, tv, rel)
            rows.append(Row(metric + tag, nbv, tv, same, note + ("" if same else drift)))

        row("ActivationSparsity", float(res["ActivationSparsity"]), tm["activation_sparsity"],
            "zeros over all LIF outputs, all steps and samples (NeuroBench: batch-weighted mean of per-batch ratios)")
        row("SynapticOperations.Dense", float(so["Dense"]), float(so_m["Dense"]),
            "real connections of one dense pass x T, padding excluded" + id_note, offset=id_dense)
        row("SynapticOperations.Effective_MACs", float(so["Effective_MACs"]), float(so_m["Effective_MACs"]),
            "tmkt --pooled-inputs mac: non-zero pooled inputs x fan-out, as NeuroBench counts them" + first_note)
        row("SynapticOperations.Effective_ACs", float(so["Effective_ACs"]), float(so_m["Effective_ACs"]),
            "binary (spike) inputs x fan-out" + id_note, offset=id_ops)
        if "ClassificationAccuracy" in res and profile_mac.accuracy is not None:
            row("ClassificationAccuracy", float(res["ClassificationAccuracy"]), float(profile_mac.accuracy),
                "argmax of the mean logits over T (NeuroBench averages per-batch float32 means: equal to 1e-6)", rel=1e-6)

    rows_for(nb, "")
    if nb_folded is not None:
        rows_for(nb_folded, " [BN folded]")
    so_nb = nb["SynapticOperations"]
    pooled = [s for s in profile_fold.synaptic if any(not f.startswith("flat") for f in s.folded)]
    rows.append(Row(
        "SynapticOperations (tmkt fold) ACs + MACs",
        float(so_nb["Effective_ACs"]) + float(so_nb["Effective_MACs"]),
        float(so_f["Effective_ACs"]) + float(so_f["Effective_MACs"]),
        None,
        f"different definition: tmkt's default folds each average pool into the next layer ({len(pooled)} layers), so "
        f"every spike costs one AC per output it reaches: {so_f['Effective_ACs']:.6g} ACs + {so_f['Effective_MACs']:.6g} MACs, "
        f"against NeuroBench's {so_nb['Effective_ACs']:.6g} ACs + {so_nb['Effective_MACs']:.6g} MACs "
        "(non-zero pooled values x fan-out, as MACs)",
    ))
    n_params = int(nb["ParameterCount"])
    dep = deploy_parameters(graph)
    bn = 0
    if model is not None:
        bn = sum(p.numel() for m in EventHeadNet(model).modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    rows.append(Row("ParameterCount", float(n_params), float(dep), None,
                    f"NeuroBench counts the trained modules: conv weights + BatchNorm weight and bias ({bn}) + head; "
                    f"the deploy graph folds BatchNorm into one bias per channel: {dep} weights and biases"
                    + ("" if nb_folded is None else f" (NeuroBench on the folded network: {int(nb_folded['ParameterCount'])})")))
    rows.append(Row("Footprint (bytes)", float(nb["Footprint"]), float(4 * dep), None,
                    "NeuroBench: parameters + buffers (BatchNorm running statistics) as stored; tmkt: deploy graph in float32"))
    rows.append(Row("ConnectionSparsity", float(nb["ConnectionSparsity"]), None, None,
                    "share of zero weights in conv/linear layers (NeuroBench only; tmkt counts structural connections, "
                    "so where it is > 0 NeuroBench's effective ops leave out zero weights and tmkt's do not)"))
    for name, why in NOT_MEASURED.items():
        rows.append(Row(name, None, float(tm["neuron_updates"]) if name == "MembraneUpdates" else None, None,
                        f"not measured by NeuroBench on spikingjelly neurons: {why}"
                        + ("; tmkt: every LIF neuron at every step (neurons x T)" if name == "MembraneUpdates" else "")))
    return rows
