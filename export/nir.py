"""Export the deploy graph to NIR (Neuromorphic Intermediate Representation) and read it back.

Mapping (one NIR node per deploy node, same names):
    Input -> nir.Input,  Conv2d -> nir.Conv2d,  Dense -> nir.Affine,  AvgPool2d -> nir.AvgPool2d,
    Flatten -> nir.Flatten(start_dim=0),  LIF -> nir.LIF,  graph output -> nir.Output.
    Add has no NIR node: NIR sums every edge that enters a node, so the Add's inputs are wired
    straight into the Add's consumers.

NIR neurons are continuous-time: tau dv/dt = (v_leak - v) + R I. Our discrete LIF,
v[t] = v[t-1] - v[t-1]/tau + I[t], is its forward-Euler step with dt = one time step when
nir tau = tau * dt and R = tau (then dt/tau_nir * R * I = I). We store dt = 1 (in units of a
time step; `metadata["dt_seconds"]` holds the bin width when binning is by time) and write
`metadata["tmkt"]` (JSON) so `read_nir` rebuilds the exact deploy graph.
"""

from __future__ import annotations

import json
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
from tmkt.fileio import atomic_path

DT = 1.0  # one time step


def _arr(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def graph_to_nir(g: DeployGraph) -> nir.NIRGraph:
    """Convert a deploy graph to an in-memory NIR graph."""
    nodes: dict[str, nir.NIRNode] = {}
    for name, node in g.nodes.items():
        ins = [g.shapes[i] for i in g.inputs[name]]
        if isinstance(node, Input):
            nodes[name] = nir.Input(input_type={"input": np.array(node.shape)})
        elif isinstance(node, Conv2d):
            nodes[name] = nir.Conv2d(
                input_shape=tuple(ins[0][1:]),
                weight=node.weight,
                stride=node.stride,
                padding=node.padding,
                dilation=node.dilation,
                groups=node.groups,
                bias=node.bias,
            )
        elif isinstance(node, Dense):
            nodes[name] = nir.Affine(weight=node.weight, bias=node.bias)
        elif isinstance(node, AvgPool2d):
            nodes[name] = nir.AvgPool2d(kernel_size=_arr(node.kernel_size), stride=_arr(node.stride), padding=_arr(node.padding))
        elif isinstance(node, Flatten):
            nodes[name] = nir.Flatten(input_type={"input": np.array(ins[0])}, start_dim=0, end_dim=-1)
        elif isinstance(node, LIF):
            shape = g.shapes[name]
            nodes[name] = nir.LIF(
                tau=np.full(shape, node.tau * DT, np.float32),
                r=np.full(shape, node.tau, np.float32),
                v_leak=np.zeros(shape, np.float32),
                v_threshold=np.full(shape, node.v_threshold, np.float32),
                v_reset=np.full(shape, node.v_reset, np.float32),
            )
        elif isinstance(node, Add):
            continue
        else:  # pragma: no cover - DeployGraph already rejects unknown nodes
            raise GraphError(f"node {name!r}: {type(node).__name__} cannot be exported to NIR")
    nodes["output"] = nir.Output(output_type={"output": np.array(g.shapes[g.output])})

    def sources(name: str) -> list[str]:
        out: list[str] = []
        for i in g.inputs[name]:
            out += sources(i) if isinstance(g.nodes[i], Add) else [i]
        return out

    edges = [(s, name) for name in nodes if name in g.nodes for s in sources(name)]
    edges.append((g.output, "output"))
    meta = {"tmkt": json.dumps({"meta": g.meta, "output": g.output, "dt_steps": DT}, default=_json_default)}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta, type_check=False)


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
    """Rebuild a deploy graph from a NIR graph written by `graph_to_nir` (or of the same shape)."""
    raw_meta = ng.metadata.get("tmkt") if isinstance(ng.metadata, dict) else None
    info = json.loads(raw_meta) if raw_meta else {}
    incoming: dict[str, list[str]] = {}
    for src, dst in ng.edges:
        incoming.setdefault(dst, []).append(src)
    order = _topological([n for n in ng.nodes if not isinstance(ng.nodes[n], nir.Output)], incoming)
    nodes: dict[str, Any] = {}
    inputs: dict[str, tuple[str, ...]] = {}
    for name in order:
        try:
            node = _node_from_nir(name, ng.nodes[name])
        except GraphError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise GraphError(f"NIR node {name!r}: {e}") from None
        nodes_srcs = tuple(incoming.get(name, []))
        if len(nodes_srcs) > 1:  # NIR sums multiple edges: make the sum explicit
            add = f"{name}_sum"
            nodes[add], inputs[add] = Add(), nodes_srcs
            nodes_srcs = (add,)
        nodes[name], inputs[name] = node, nodes_srcs
    out_srcs = [s for s, d in ng.edges if isinstance(ng.nodes[d], nir.Output)]
    if len(out_srcs) != 1:
        raise GraphError(f"NIR graph must have one edge into its Output node, found {len(out_srcs)}")
    return DeployGraph(nodes, inputs, output=out_srcs[0], meta=info.get("meta", {}))


def _node_from_nir(name: str, n: nir.NIRNode) -> Any:
    """One deploy node from one NIR node."""
    if isinstance(n, nir.Input):
        node: Any = Input(tuple(int(v) for v in np.asarray(n.input_type["input"]).ravel()))
    elif isinstance(n, nir.Conv2d):
        node = Conv2d(n.weight, n.bias, tuple(n.stride), tuple(n.padding), tuple(n.dilation), int(n.groups))
    elif isinstance(n, nir.Affine):
        node = Dense(n.weight, n.bias)
    elif isinstance(n, nir.AvgPool2d):
        node = AvgPool2d(tuple(_arr(n.kernel_size)), tuple(_arr(n.stride)), tuple(_arr(n.padding)))
    elif isinstance(n, nir.Flatten):
        node = Flatten()
    elif isinstance(n, nir.LIF):
        tau_nir, r = _scalar(n.tau, "tau", name), _scalar(n.r, "r", name)
        if not np.isclose(r, tau_nir / DT):
            raise GraphError(f"NIR node {name!r}: r={r} != tau/dt={tau_nir / DT}: not the discrete LIF of tmkt")
        if _scalar(n.v_leak, "v_leak", name) != 0.0:
            raise GraphError(f"NIR node {name!r}: v_leak must be 0")
        reset = 0.0 if n.v_reset is None else _scalar(n.v_reset, "v_reset", name)
        node = LIF(tau=tau_nir / DT, v_threshold=_scalar(n.v_threshold, "v_threshold", name), v_reset=reset)
    else:
        raise GraphError(f"NIR node {name!r}: {type(n).__name__} is not supported by tmkt's deploy graph")
    return node


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


def export_nir(graph: DeployGraph, path: str | Path, *, verify: bool = True) -> ExportReport:
    """Write `graph` to a NIR HDF5 file; returns its report.

    With `verify`, before the file appears: it is read back and the rebuilt graph must give the
    same step logits (within 1e-6) and the same spikes as `graph` on random binary frames;
    otherwise ExportVerificationError and no file. Figures: max_abs_logit_diff, spikes_identical.
    """
    path = Path(path)
    checks = {"NIR read-back vs deploy graph": "skipped"}
    figures: dict[str, Any] = {}
    with atomic_path(path) as tmp:
        nir.write(tmp, graph_to_nir(graph))
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
    return ExportReport("nir", path, f"{len(graph.nodes)} nodes, dt = 1 time step", checks, figures)


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
