"""Export the deploy graph to NIR (Neuromorphic Intermediate Representation) and read it back.

The file is written so that norse, snntorch and sinabs run it with tmkt's numbers through
their own NIR import (docs/nir.md; what each importer assumes: /work/shared/NIR-NOTES.md):

    Input -> nir.Input,  Conv2d -> nir.Conv2d,  Dense -> nir.Affine,  LIF -> nir.LIF,
    AvgPool2d -> nir.SumPool2d with every consuming Conv2d/Affine's weights divided by the
        kernel area (exact for spikes; norse and sinabs map no AvgPool2d),
    Flatten -> nir.Flatten(start_dim=1) (the importers hand start_dim to torch.nn.Flatten, which
        counts the batch; the "sinabs" flavour writes 0, which sinabs shifts by one itself),
    graph output -> nir.Output. Add has no NIR node: NIR sums every edge that enters a node,
    so the Add's inputs are wired straight into the Add's consumers.

NIR neurons are continuous-time, tau dv/dt = (v_leak - v) + r I, and every importer takes a
forward-Euler step dt of its own. tmkt's LIF, v[t] = v[t-1] - v[t-1]/tau + I[t], is that step
when tau_nir = tau * dt and r * dt / tau_nir = 1. norse ignores r, so the gain tau is folded
into the weights and bias of the synapse feeding each LIF and r = 1 (snntorch then raises its
threshold by the same factor); dt = 1e-4 s (snntorch's fixed step; norse: from_nir(graph,
dt=1e-4)); tau is written in float64 so that dt / tau_nir is exactly 1/tau where it can be. The
importers spike on v > threshold, tmkt on v >= v_th: the threshold is written one float32 step
below v_th. sinabs counts tau in time steps and decays by exp(-1/tau): `flavor="sinabs"` writes
tau = -1/ln(1 - 1/tau), no gain fold, the threshold itself (sinabs spikes on v >= threshold),
one-element parameters and nir 1.0.4's LIF (no v_reset). sinabs's neuron still differs: it emits
several spikes per step and subtracts the threshold instead of resetting to 0 (docs/nir.md).
`metadata["tmkt"]` (JSON) holds dt and the flavour, so `read_nir` rebuilds the deploy graph.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import nir
import numpy as np
import torch

from tmkt.export.graph import (
    LIF,
    Add,
    AvgPool2d,
    Conv2d,
    Dense,
    DeployGraph,
    Flatten,
    GraphError,
    Input,
    run_graph,
)
from tmkt.export.report import ExportReport, ExportVerificationError
from tmkt.fileio import atomic_bytes

DT = 1e-4  # seconds per time step written into the file: snntorch's fixed dt (norse: from_nir(g, dt=1e-4))
FLAVORS = ("default", "sinabs")


def _arr(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def _below(v: float) -> float:
    """The float32 just below v: `x > below(v)` is `x >= v` for float32 x."""
    return float(np.nextafter(np.float32(v), np.float32(-np.inf)))


def _above(v: float) -> float:
    return float(np.nextafter(np.float32(v), np.float32(np.inf)))


def _pool_divisors(g: DeployGraph) -> dict[str, float]:
    """Divisor of each Conv2d/Dense's weights (not bias) that reads an AvgPool2d written as SumPool2d."""
    out: dict[str, float] = {}
    for name, node in g.nodes.items():
        if not isinstance(node, AvgPool2d):
            continue
        area = float(node.kernel_size[0] * node.kernel_size[1])
        todo = g.consumers(name)
        while todo:
            c = todo.pop()
            if isinstance(g.nodes[c], Flatten):
                todo += g.consumers(c)
            elif isinstance(g.nodes[c], (Conv2d, Dense)) and len(g.inputs[c]) == 1:
                out[c] = out.get(c, 1.0) * area
            else:
                raise GraphError(f"node {name!r}: average pooling feeding {c!r} cannot be written to NIR as SumPool2d")
    return out


def _gains(g: DeployGraph, flavor: str) -> dict[str, float]:
    """Factor (tau) folded into each synapse that feeds a LIF alone (default flavour only)."""
    if flavor == "sinabs":
        return {}
    out: dict[str, float] = {}
    for name in g.lif_names():
        (src,) = g.inputs[name] if len(g.inputs[name]) == 1 else (None,)
        if src is not None and isinstance(g.nodes[src], (Conv2d, Dense)) and g.consumers(src) == [name]:
            out[src] = float(g.nodes[name].tau)
    return out


def _dense_as_conv(g: DeployGraph) -> dict[str, dict[str, Any]]:
    """Dense layers to write as Conv2d over the (C, H, W) map they read (kernel H x W), with the
    Flatten each one follows: norse and snntorch hand a NIR Flatten's start_dim to
    torch.nn.Flatten, which counts the batch, so a file with Flatten runs batched in neither."""
    out: dict[str, dict[str, Any]] = {}
    for name, node in g.nodes.items():
        if not isinstance(node, Dense):
            continue
        (src,) = g.inputs[name]
        flatten = src if isinstance(g.nodes[src], Flatten) else None
        shape = g.shapes[g.inputs[src][0]] if flatten else g.shapes[src]
        if len(shape) == 1:
            shape = (shape[0], 1, 1)
        out[name] = {"map": [int(v) for v in shape], "flatten": flatten}
    return out


def graph_to_nir(g: DeployGraph, *, dt: float = DT, flavor: str = "default") -> nir.NIRGraph:
    """Convert a deploy graph to an in-memory NIR graph (see the module docstring)."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    divisors, gains = _pool_divisors(g), _gains(g, flavor)
    as_conv = _dense_as_conv(g) if flavor == "default" else {}
    nodes: dict[str, nir.NIRNode] = {}
    shapes = dict(g.shapes)
    for name, node in g.nodes.items():
        ins = [shapes[i] for i in g.inputs[name]]
        if isinstance(node, (Conv2d, Dense)):
            gain = gains.get(name, 1.0)
            weight = node.weight.astype(np.float64) * gain / divisors.get(name, 1.0)
            bias = node.bias.astype(np.float64) * gain
            weight, bias = weight.astype(np.float32), bias.astype(np.float32)
        if isinstance(node, Input):
            nodes[name] = nir.Input(input_type={"input": np.array(node.shape)})
        elif isinstance(node, Conv2d):
            nodes[name] = nir.Conv2d(
                input_shape=tuple(ins[0][1:]), weight=weight, stride=node.stride, padding=node.padding,
                dilation=node.dilation, groups=node.groups, bias=bias,
            )
        elif isinstance(node, Dense) and name in as_conv:  # a conv whose kernel covers the whole map
            c, h, w = as_conv[name]["map"]
            nodes[name] = nir.Conv2d(input_shape=(h, w), weight=weight.reshape(-1, c, h, w), stride=1, padding=0,
                                     dilation=1, groups=1, bias=bias)
            shapes[name] = (weight.shape[0], 1, 1)
        elif isinstance(node, Dense):
            nodes[name] = nir.Affine(weight=weight, bias=bias)
        elif isinstance(node, AvgPool2d):
            nodes[name] = nir.SumPool2d(kernel_size=_arr(node.kernel_size), stride=_arr(node.stride), padding=_arr(node.padding))
        elif isinstance(node, Flatten) and as_conv:
            shapes[name] = ins[0]
            continue  # the Dense convolutions read the map itself
        elif isinstance(node, Flatten):
            nodes[name] = nir.Flatten(input_type={"input": np.array(ins[0])}, start_dim=0, end_dim=-1)
        elif isinstance(node, LIF):
            shapes[name] = ins[0]
            nodes[name] = _lif_to_nir(name, node, shapes[name], dt, flavor, folded=any(
                gains.get(src) for src in g.inputs[name]))
        elif isinstance(node, Add):
            shapes[name] = ins[0]
            continue
        else:  # pragma: no cover - DeployGraph already rejects unknown nodes
            raise GraphError(f"node {name!r}: {type(node).__name__} cannot be exported to NIR")
    nodes["output"] = nir.Output(output_type={"output": np.array(shapes[g.output])})

    def sources(name: str) -> list[str]:
        out: list[str] = []
        for i in g.inputs[name]:
            out += sources(i) if i not in nodes else [i]
        return out

    edges = [(s, name) for name in nodes if name in g.nodes for s in sources(name)]
    edges.append((g.output, "output"))
    info = {"meta": g.meta, "output": g.output, "dt": dt, "flavor": flavor, "pooling": "sum",
            "dense_as_conv": as_conv}
    meta = {"tmkt": json.dumps(info, default=_json_default)}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta, type_check=False)


def _lif_to_nir(name: str, node: LIF, shape: tuple[int, ...], dt: float, flavor: str, folded: bool) -> nir.LIF:
    if flavor == "sinabs":
        if node.tau <= 1.0:
            raise GraphError(f"node {name!r}: tau={node.tau} has no sinabs decay exp(-1/tau_steps) equal to 1 - 1/tau")
        one = (1,)  # sinabs reads one-element parameters; nir 1.0.4's LIF has no v_reset
        # sinabs spikes on v >= threshold (trunc(v / threshold) spikes), as tmkt does: no shift
        return nir.LIF(tau=np.full(one, -1.0 / math.log1p(-1.0 / node.tau)), r=np.ones(one), v_leak=np.zeros(one),
                       v_threshold=np.full(one, node.v_threshold))
    r = 1.0 if folded else node.tau
    return nir.LIF(
        tau=np.full(shape, node.tau * dt, np.float64), r=np.full(shape, r, np.float64),
        v_leak=np.zeros(shape, np.float32), v_threshold=np.full(shape, _below(node.v_threshold), np.float32),
        v_reset=np.full(shape, node.v_reset, np.float32),
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def _scalar(a: np.ndarray, what: str, name: str) -> float:
    a = np.asarray(a, dtype=np.float64)
    if not np.allclose(a, a.flat[0]):
        raise GraphError(f"NIR node {name!r}: {what} varies per neuron, which the deploy graph cannot hold")
    return float(a.flat[0])


def nir_to_graph(ng: nir.NIRGraph) -> DeployGraph:
    """Rebuild a deploy graph from a NIR graph written by `graph_to_nir` (or of the same shape):
    each LIF's gain r * dt / tau_nir goes back into the synapse that feeds it, SumPool2d becomes
    AvgPool2d with its consumers' weights times the kernel area."""
    raw_meta = ng.metadata.get("tmkt") if isinstance(ng.metadata, dict) else None
    info = json.loads(raw_meta) if raw_meta else {}
    dt = float(info.get("dt", info.get("dt_steps", 1.0)))
    flavor = info.get("flavor", "default")
    as_conv = info.get("dense_as_conv", {})
    incoming: dict[str, list[str]] = {}
    for src, dst in ng.edges:
        incoming.setdefault(dst, []).append(src)
    order = _topological([n for n in ng.nodes if not isinstance(ng.nodes[n], nir.Output)], incoming)
    nodes: dict[str, Any] = {}
    inputs: dict[str, tuple[str, ...]] = {}
    for name in order:
        try:
            node, gain = _node_from_nir(name, ng.nodes[name], dt, flavor)
        except GraphError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise GraphError(f"NIR node {name!r}: {e}") from None
        nodes_srcs = tuple(incoming.get(name, []))
        if name in as_conv:  # written as a conv over the whole map: a Dense again, after its Flatten
            node = Dense(np.asarray(node.weight).reshape(node.weight.shape[0], -1), node.bias)
            if as_conv[name].get("flatten"):
                flat = as_conv[name]["flatten"]
                nodes[flat], inputs[flat] = Flatten(), nodes_srcs
                nodes_srcs = (flat,)
        if gain != 1.0:
            if len(nodes_srcs) != 1 or not isinstance(nodes.get(nodes_srcs[0]), (Conv2d, Dense)):
                raise GraphError(f"NIR node {name!r}: input gain {gain} needs one Conv2d/Affine feeding it")
            src = nodes[nodes_srcs[0]]
            src.weight, src.bias = src.weight * np.float32(gain), src.bias * np.float32(gain)
        if isinstance(ng.nodes[name], nir.SumPool2d):
            area = np.float32(node.kernel_size[0] * node.kernel_size[1])
            todo = [d for s_, d in ng.edges if s_ == name]
            while todo:
                c = todo.pop()
                if isinstance(ng.nodes[c], nir.Flatten):
                    todo += [d for s_, d in ng.edges if s_ == c]
                elif isinstance(ng.nodes[c], (nir.Conv2d, nir.Affine)):
                    ng.nodes[c].weight = np.asarray(ng.nodes[c].weight) * area
                else:
                    raise GraphError(f"NIR node {name!r}: SumPool2d feeding {c!r} has no deploy-graph equivalent")
        if len(nodes_srcs) > 1:  # NIR sums multiple edges: make the sum explicit
            add = f"{name}_sum"
            nodes[add], inputs[add] = Add(), nodes_srcs
            nodes_srcs = (add,)
        nodes[name], inputs[name] = node, nodes_srcs
    out_srcs = [s for s, d in ng.edges if isinstance(ng.nodes[d], nir.Output)]
    if len(out_srcs) != 1:
        raise GraphError(f"NIR graph must have one edge into its Output node, found {len(out_srcs)}")
    return DeployGraph(nodes, inputs, output=out_srcs[0], meta=info.get("meta", {}))


def _node_from_nir(name: str, n: nir.NIRNode, dt: float = 1.0, flavor: str = "default") -> tuple[Any, float]:
    """One deploy node from one NIR node, and the gain a LIF applies to its input (1 otherwise)."""
    gain = 1.0
    if isinstance(n, nir.Input):
        node: Any = Input(tuple(int(v) for v in np.asarray(n.input_type["input"]).ravel()))
    elif isinstance(n, nir.Conv2d):
        node = Conv2d(n.weight, n.bias, tuple(n.stride), tuple(n.padding), tuple(n.dilation), int(n.groups))
    elif isinstance(n, nir.Affine):
        node = Dense(n.weight, n.bias)
    elif isinstance(n, (nir.AvgPool2d, nir.SumPool2d)):
        node = AvgPool2d(tuple(_arr(n.kernel_size)), tuple(_arr(n.stride)), tuple(_arr(n.padding)))
    elif isinstance(n, nir.Flatten):
        node = Flatten()
    elif isinstance(n, nir.LIF):
        tau_nir, r = _scalar(n.tau, "tau", name), _scalar(n.r, "r", name)
        if _scalar(n.v_leak, "v_leak", name) != 0.0:
            raise GraphError(f"NIR node {name!r}: v_leak must be 0")
        reset = 0.0 if getattr(n, "v_reset", None) is None else _scalar(n.v_reset, "v_reset", name)
        threshold = _scalar(n.v_threshold, "v_threshold", name)
        if flavor == "sinabs":  # decay exp(-1/tau_steps) = 1 - 1/tau, input not scaled, spike on v >= threshold
            tau, gain = 1.0 / -math.expm1(-1.0 / tau_nir), 1.0
        else:
            tau, gain, threshold = tau_nir / dt, r * dt / tau_nir, _above(threshold)
        node = LIF(tau=tau, v_threshold=threshold, v_reset=reset)
    else:
        raise GraphError(f"NIR node {name!r}: {type(n).__name__} is not supported by tmkt's deploy graph")
    return node, gain


def _topological(names: list[str], incoming: dict[str, list[str]]) -> list[str]:
    done: list[str] = []
    pending = list(names)
    while pending:
        ready = [n for n in pending if all(s in done for s in incoming.get(n, []))]
        if not ready:
            raise GraphError(f"NIR graph has a cycle or dangling edges among {pending[:5]}")
        # Inputs first, then keep the file's order among ready nodes.
        ready.sort(key=lambda n: 0 if not incoming.get(n) else 1)
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def export_nir(graph: DeployGraph, path: str | Path, *, verify: bool = True, flavor: str = "default",
               dt: float = DT) -> ExportReport:
    """Write `graph` to a NIR HDF5 file; returns its report. `flavor` "sinabs" writes the file
    sinabs 3.1.3 (nir 1.0.4) reads and runs as closely as its neuron allows (module docstring).

    With `verify`, before the file appears: it is read back and the rebuilt graph must give the
    same step logits (within 1e-6) and the same spikes as `graph` on random binary frames;
    otherwise ExportVerificationError and no file. Figures: max_abs_logit_diff, spikes_identical.
    """
    path = Path(path)
    checks = {"NIR read-back vs deploy graph": "skipped"}
    figures: dict[str, Any] = {}
    # built in memory (h5py never meets a full disk), written by a plain write, locked against a
    # second writer of `path`, checked in place before the rename
    with atomic_bytes(path, nir_image(graph, dt=dt, flavor=flavor), exclusive=True) as tmp:
        if verify:
            figures = compare_readback(graph, read_nir(tmp))
            if figures["max_abs_logit_diff"] > 1e-6 or not figures["spikes_identical"]:
                raise ExportVerificationError(
                    f"NIR read-back of {path} differs from the deploy graph "
                    f"(max |dlogit| {figures['max_abs_logit_diff']:.3g})", figures,
                )
            checks["NIR read-back vs deploy graph"] = (
                f"max |dlogit| {figures['max_abs_logit_diff']:.3g}, spikes identical"
            )
    return ExportReport("nir", path, f"{len(graph.nodes)} nodes, dt = {dt:g} s per step, flavour {flavor}", checks, figures)


def nir_image(graph: DeployGraph, *, dt: float = DT, flavor: str = "default") -> bytes:
    """The NIR HDF5 file of `graph` as bytes, built in memory."""
    import io

    buf = io.BytesIO()
    nir.write(buf, graph_to_nir(graph, dt=dt, flavor=flavor))
    if flavor == "sinabs":
        _as_nir_104(buf)
    return buf.getvalue()


def _as_nir_104(path: Path | Any) -> None:
    """Drop what nir <= 1.0.4 (sinabs 3.1.3's pin) cannot read: nir >= 1.0.5 writes a LIF's v_reset
    even when it is not given, and 1.0.4's LIF takes no such argument."""
    import h5py

    with h5py.File(path, "a") as f:
        for group in f["node/nodes"].values():
            if group["type"][()] in (b"LIF", "LIF") and "v_reset" in group:
                del group["v_reset"]


def compare_readback(graph: DeployGraph, back: DeployGraph, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Both graphs on the same random binary frames: {"max_abs_logit_diff", "spikes_identical"}."""
    gen = torch.Generator().manual_seed(seed)
    t = int(graph.meta.get("timesteps", 4))
    x = (torch.rand((t, batch, *graph.input_shape), generator=gen) < 0.3).float()
    a, b = run_graph(graph, x), run_graph(back, x)
    diff = float((a["step_logits"] - b["step_logits"]).abs().max())
    same = set(a["spikes"]) == set(b["spikes"]) and all(torch.equal(a["spikes"][n], b["spikes"][n]) for n in a["spikes"])
    return {"max_abs_logit_diff": diff, "spikes_identical": same}


def read_nir(path: str | Path) -> DeployGraph:
    """Read a NIR file into a deploy graph."""
    try:
        ng = nir.read(str(path), type_check=False)
    except Exception as e:  # nir/h5py raise many kinds of errors for foreign files
        raise GraphError(f"{path}: not a readable NIR file ({e})") from None
    return nir_to_graph(ng)
