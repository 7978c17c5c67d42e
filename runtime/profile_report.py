"""Render a `Profile` and its energy estimates: JSON (keys in docs/hw-profiles.md), rich tables, PNG.

All numbers are per inference (one sample over all T steps) unless a key says `per_step`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tmkt.runtime.energy import EnergyEstimate
from tmkt.runtime.profiler import NeuronLayer, Profile, SynapticLayer

FORMAT = "tmkt-profile/1"

__all__ = ["FORMAT", "energy_table", "format_energy", "layer_table", "neurobench_table", "plot_profile", "profile_dict",
           "write_json"]


def format_energy(pj: float | None) -> str:
    """pJ with an SI prefix that keeps 1-3 integer digits ("12.3 nJ")."""
    if pj is None:
        return "n/a"
    value, units = float(pj), ["pJ", "nJ", "µJ", "mJ", "J"]
    i = 0
    while abs(value) >= 1000 and i < len(units) - 1:
        value /= 1000
        i += 1
    return f"{value:.3g} {units[i]}"


def _count(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.3g} M"
    if x >= 1e3:
        return f"{x / 1e3:.3g} k"
    return f"{x:.3g}"


def _layer_dict(p: Profile, layer: SynapticLayer | NeuronLayer) -> dict[str, Any]:
    if isinstance(layer, NeuronLayer):
        rate = p.firing_rate(layer)
        return {
            "name": layer.name,
            "type": "LIF",
            "neurons": layer.neurons,
            "spikes": p.per_inference(layer.spikes),
            "firing_rate": rate,
            "activation_sparsity": 1.0 - rate,
            "neuron_updates": layer.neurons * p.timesteps,
        }
    ops = p.per_inference(layer.ops)
    counted = layer.inputs_per_step * p.timesteps * p.samples
    return {
        "name": layer.name,
        "type": layer.op,
        "source": layer.source,
        "folded": list(layer.folded),
        "counted_as": layer.counted_as,
        "dense_per_step": layer.dense_per_step,
        "dense": layer.dense_per_step * p.timesteps,
        "effective_ops": ops,
        "effective_acs": ops if layer.binary else 0.0,
        "effective_macs": 0.0 if layer.binary else ops,
        "inputs_per_step": layer.inputs_per_step,
        "input_nonzero": p.per_inference(layer.nonzero),
        "input_sparsity": 1.0 - layer.nonzero / counted,
    }


def _energy_dict(e: EnergyEstimate) -> dict[str, Any]:
    return {
        "event_driven": e.hw.event_driven,
        "snn_pj": {
            "synops": e.synops_pj,
            "macs": e.macs_pj,
            "neurons": e.neurons_pj,
            "spikes": e.spikes_pj,
            "static": e.static_pj,
            "total": e.total_pj,
        },
        "uncosted_macs": e.uncosted_macs,
        "ann_one_pass_pj": e.ann_one_pass_pj,
        "ann_t_passes_pj": e.ann_t_passes_pj,
        "ann_over_snn_one_pass": e.ann_over_snn_one_pass,
        "ann_over_snn_t_passes": e.ann_over_snn_t_passes,
        "per_layer_pj": dict(e.per_layer_pj),
        "profile": e.hw.to_dict(),
    }


def profile_dict(p: Profile, estimates: list[EnergyEstimate], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document: format, meta, layers, totals, energy (see docs/hw-profiles.md)."""
    return {
        "format": FORMAT,
        "meta": {
            **(meta or {}),
            "samples": p.samples,
            "timesteps": p.timesteps,
            "pooled_inputs": p.pooled_inputs,
            "accuracy": p.accuracy,
        },
        "layers": [_layer_dict(p, layer) for layer in p.layers],
        "totals": p.totals(),
        "energy": {e.hw.name: _energy_dict(e) for e in estimates},
    }


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    from tmkt.checkpoint import atomic_write_json

    atomic_write_json(Path(path), doc)


def layer_table(p: Profile, title: str = "Per layer, per inference"):
    """rich Table: one row per LIF and synaptic layer, then totals.

    `sparsity` is the activation sparsity of a LIF layer and the input sparsity of a synaptic
    one; `input` names the counted node (+ folded pools); ops are ACs or MACs as `op` says.
    """
    from rich.table import Table

    t = Table(title=title)
    for col in ("layer", "op", "input", "neurons", "spikes", "rate", "sparsity", "Dense", "Eff. ops"):
        t.add_column(col, justify="left" if col in ("layer", "op", "input") else "right")
    for layer in p.layers:
        d = _layer_dict(p, layer)
        if d["type"] == "LIF":
            t.add_row(d["name"], "LIF", "", str(d["neurons"]), _count(d["spikes"]), f"{d['firing_rate']:.4f}",
                      f"{d['activation_sparsity']:.4f}", "", "")
        else:
            src = "+".join([d["source"], *d["folded"]])
            t.add_row(d["name"], f"{d['type']} {d['counted_as']}", src, "", "", "", f"{d['input_sparsity']:.4f}",
                      _count(d["dense"]), _count(d["effective_ops"]))
    tot = p.totals()
    so = tot["synaptic_operations"]
    t.add_section()
    t.add_row("total", "", "", str(tot["neurons"]), _count(tot["spikes"]), f"{tot['firing_rate']:.4f}",
              f"{tot['activation_sparsity']:.4f}", _count(so["Dense"]),
              f"{_count(so['Effective_ACs'])} AC\n{_count(so['Effective_MACs'])} MAC")
    return t


def energy_table(estimates: list[EnergyEstimate], title: str = "Energy per inference"):
    """rich Table: one row per hardware profile.

    `*` marks a profile with unverified numbers, `(dense)` one that is not event-driven,
    `†` MACs left uncosted (no e_mac_pj). ANN/SNN > 1 means the SNN uses less energy.
    """
    from rich.table import Table

    show_spikes = any(e.spikes_pj for e in estimates)
    show_static = any(e.static_pj for e in estimates)
    t = Table(title=title)
    cols = ["profile", "SNN", "synaptic", "neurons"]
    cols += ["spikes"] * show_spikes + ["static"] * show_static
    cols += ["ANN 1 pass", "ANN/SNN", "ANN T passes", "ANN/SNN (T)"]
    for col in cols:
        t.add_column(col, justify="left" if col == "profile" else "right")
    for e in estimates:
        name = e.hw.name + ("*" if e.hw.unverified else "") + ("" if e.hw.event_driven else " (dense)")
        syn = format_energy(e.synops_pj + e.macs_pj) + (" †" if e.uncosted_macs else "")
        row = [name, format_energy(e.total_pj), syn, format_energy(e.neurons_pj)]
        row += [format_energy(e.spikes_pj)] * show_spikes + [format_energy(e.static_pj)] * show_static
        r1, rt = e.ann_over_snn_one_pass, e.ann_over_snn_t_passes
        row += [format_energy(e.ann_one_pass_pj), "n/a" if r1 is None else f"{r1:.3g}x",
                format_energy(e.ann_t_passes_pj), "n/a" if rt is None else f"{rt:.3g}x"]
        t.add_row(*row)
    return t


def plot_profile(p: Profile, estimates: list[EnergyEstimate], path: str | Path) -> None:
    """PNG: firing rate per LIF layer, and each layer's share of the SNN energy per profile."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, no global backend switch
    fig = Figure(figsize=(10, 7 if estimates else 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if estimates else 1, 1, squeeze=False)[:, 0]
    lifs = p.neuron
    axes[0].bar([n.name for n in lifs], [p.firing_rate(n) for n in lifs], color="tab:blue")
    axes[0].set_ylabel("firing rate (spikes / neuron / step)")
    axes[0].set_title(f"Firing rate per LIF layer ({p.samples} samples, T={p.timesteps})")
    if estimates:
        names = [layer.name for layer in p.layers]
        x = np.arange(len(names))
        width = 0.8 / len(estimates)
        for k, e in enumerate(estimates):
            total = e.total_pj - e.static_pj
            share = [100.0 * e.per_layer_pj.get(n, 0.0) / total if total else 0.0 for n in names]
            axes[1].bar(x + (k - (len(estimates) - 1) / 2) * width, share, width, label=e.hw.name)
        axes[1].set_xticks(x, names, rotation=45, ha="right")
        axes[1].set_ylabel("share of SNN energy (%)")
        axes[1].set_title("Energy share per layer (static power excluded)")
        axes[1].legend(fontsize="small", ncols=min(3, len(estimates)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png", dpi=100)


def neurobench_table(rows, title: str = "NeuroBench 2.3 harness beside tmkt's profiler (per inference)"):
    """rich Table of `tmkt.runtime.neurobench.compare` rows: metric, NeuroBench, tmkt, agree?, why."""
    from rich.table import Table

    def cell(v):
        return "n/a" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))

    t = Table(title=title)
    for col in ("metric", "NeuroBench", "tmkt", "equal", "note"):
        t.add_column(col, justify="right" if col in ("NeuroBench", "tmkt") else "left", overflow="fold")
    for r in rows:
        t.add_row(r.metric, cell(r.neurobench), cell(r.tmkt), {True: "yes", False: "NO", None: "-"}[r.equal], r.note)
    return t
