"""The netx HDF5 format (netx 0.6.0 layout) and the export to it: 8-bit fixed point, CUBA neurons.

The file is written with h5py alone (no lava import). Layout, as `lava.lib.dl.netx.hdf5.Network`
reads it (lava-dl 0.6.0, hdf5.py / utils.NetDict):

    layer/0     type "input", shape [C, H, W], neuron/ (passes binary spikes through)
    layer/k     type "conv":  shape [C, H, W] (output), inChannels, outChannels, kernelSize [kh, kw],
                stride/padding/dilation [y, x], groups, weight [O, I/g, kh, kw] (PyTorch order,
                correlation), bias [O], neuron/
    layer/k     type "flatten" (before a dense layer fed by a map), shape [C*H*W]
    layer/k     type "dense": shape [O], inFeatures, outFeatures, weight [O, I], bias [O], neuron/
    neuron/     type "CUBA", iDecay, vDecay, vThMant, refDelay, gradedSpike
    meta/       json (everything below, as one JSON string), timesteps, input_shape,
                class_names, scales, reset_interval, tmkt_version: netx never reads `meta/`

Axis order: netx reverses every stored `shape`, `stride`, `padding`, `dilation` into lava's
(x, y, z) = (W, H, C) order and flips the stored conv kernel spatially (lava convolves, PyTorch
correlates), so the file keeps PyTorch's (C, H, W) / (y, x) / correlation conventions; a
flatten transposes lava's (W, H, C) back to (C, H, W) before flattening, as PyTorch does.

Running it: `hdf5.Network(net_config=path, reset_interval=T)` with `Loihi2SimCfg(select_tag=
"fixed_pt")`, samples fed back to back (T steps each) into `net.inp`; layer k (input = 0) emits
frame j of sample n at step 1 + n*T + j + k; the readout's v / 64 at step n*T + T + L (L synaptic
layers) is the integer logit sum. See docs/loihi.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tmkt.export.graph import DeployGraph, as_pair, run_graph
from tmkt.export.netx_sim import simulate
from tmkt.export.quantize import ConvGeometry, CubaParams, LavaExportError, QLayer, QuantizedNet, quantize_graph
from tmkt.export.report import ExportReport
from tmkt.fileio import atomic_path

FORMAT = "tmkt-netx/1"
INPUT_NEURON = CubaParams(i_decay=4096, v_decay=4096, v_th_mant=0)  # a_in >= 1 -> one spike
# Frames (counts, bilinearly resized, so fractional) are rounded to integer counts and the input
# neuron fires on a count >= 1: spike = frame > 0.5. On the built-in digits this keeps the float
# accuracy; "any event" (> 0) smears the resized frames and cost 4 to 16 points.
INPUT_THRESHOLD = 0.5

# A check run on the written (not yet renamed) file: (path, spikes [N, T, C, H, W]) -> figures.
# `tmkt.runtime.lava.lava_check` is one: lava-dl itself must match the simulator spike for spike.
FileCheck = Callable[[Path, np.ndarray], dict[str, Any]]


# ---------------------------------------------------------------- one write/read pair per layer kind


def _text(dataset: Any) -> str:
    value = dataset[()]
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_pair(dataset: Any) -> tuple[int, int]:
    values = np.atleast_1d(np.asarray(dataset[()]))
    return as_pair(tuple(values[:2]) if values.size > 1 else values[0])


def _write_neuron(group: Any, neuron: CubaParams) -> None:
    g = group.create_group("neuron")
    g.create_dataset("type", data=np.bytes_("CUBA"))
    g.create_dataset("iDecay", data=np.int64(neuron.i_decay))
    g.create_dataset("vDecay", data=np.int64(neuron.v_decay))
    g.create_dataset("vThMant", data=np.int64(neuron.v_th_mant))
    g.create_dataset("refDelay", data=np.int64(neuron.ref_delay))
    g.create_dataset("gradedSpike", data=np.bool_(False))


def _read_neuron(group: Any) -> CubaParams:
    kind = _text(group["type"])
    if kind not in ("CUBA", "LOIHI"):
        raise LavaExportError(f"neuron type {kind!r} is not simulated (only CUBA)")
    return CubaParams(i_decay=int(group["iDecay"][()]), v_decay=int(group["vDecay"][()]),
                      v_th_mant=int(group["vThMant"][()]), ref_delay=int(group["refDelay"][()]))


def _write_synapse(group: Any, layer: QLayer) -> None:
    """What conv and dense layers share: tmkt's attributes, shape, weight, bias, neuron."""
    group.attrs["tmkt_name"] = layer.name
    group.attrs["scale"] = layer.scale
    group.attrs["readout"] = layer.readout
    group.create_dataset("shape", data=np.asarray(layer.out_shape, np.int64))
    group.create_dataset("weight", data=layer.weight.astype(np.int32))
    group.create_dataset("bias", data=layer.bias.astype(np.int32))
    _write_neuron(group, layer.neuron)


def _synapse_fields(group: Any, index: int, is_last: bool) -> dict[str, Any]:
    """The fields `_write_synapse` wrote, as QLayer keywords (defaults for files not from tmkt)."""
    out_shape = tuple(int(s) for s in np.atleast_1d(group["shape"][()]))
    weight = np.asarray(group["weight"][()]).astype(np.int32)
    n_out = weight.shape[0]
    bias = np.asarray(group["bias"][()]).astype(np.int32) if "bias" in group else np.zeros(n_out, np.int32)
    return {
        "name": str(group.attrs.get("tmkt_name", f"layer{index}")), "weight": weight, "bias": bias,
        "out_shape": out_shape, "neuron": _read_neuron(group["neuron"]),
        "scale": float(group.attrs.get("scale", 1.0)), "readout": bool(group.attrs.get("readout", is_last)),
    }


def create_conv(group: Any, layer: QLayer) -> None:
    _write_synapse(group, layer)
    group.create_dataset("inChannels", data=np.int64(layer.in_shape[0]))
    group.create_dataset("outChannels", data=np.int64(layer.out_shape[0]))
    group.create_dataset("kernelSize", data=np.asarray(layer.weight.shape[2:], np.int64))
    group.create_dataset("stride", data=np.asarray(layer.stride, np.int64))
    group.create_dataset("padding", data=np.asarray(layer.padding, np.int64))
    group.create_dataset("dilation", data=np.asarray(layer.dilation, np.int64))
    group.create_dataset("groups", data=np.int64(layer.groups))


def read_conv(group: Any, index: int, in_shape: tuple[int, ...], flatten: bool, is_last: bool) -> QLayer:
    geometry = ConvGeometry(stride=_read_pair(group["stride"]), padding=_read_pair(group["padding"]),
                            dilation=_read_pair(group["dilation"]),
                            groups=int(np.asarray(group["groups"][()]).ravel()[0]))
    return QLayer(kind="conv", in_shape=in_shape, geometry=geometry, **_synapse_fields(group, index, is_last))


def create_dense(group: Any, layer: QLayer) -> None:
    _write_synapse(group, layer)
    group.create_dataset("inFeatures", data=np.int64(layer.weight.shape[1]))
    group.create_dataset("outFeatures", data=np.int64(layer.weight.shape[0]))


def read_dense(group: Any, index: int, in_shape: tuple[int, ...], flatten: bool, is_last: bool) -> QLayer:
    fields = _synapse_fields(group, index, is_last)
    fields["weight"] = fields["weight"].reshape(fields["out_shape"][-1], -1)
    fields["out_shape"] = (int(np.prod(fields["out_shape"])),)
    return QLayer(kind="dense", in_shape=in_shape, flatten=flatten, **fields)


_WRITERS: dict[str, Callable[[Any, QLayer], None]] = {"conv": create_conv, "dense": create_dense}
_READERS: dict[str, Callable[..., QLayer]] = {"conv": read_conv, "dense": read_dense}


# ---------------------------------------------------------------- the file


def _meta(net: QuantizedNet) -> dict[str, Any]:
    meta = dict(net.meta)
    meta.update(
        format=FORMAT,
        input_shape=list(net.input_shape),
        reset_interval=int(meta.get("timesteps", 1)),
        input_encoding=meta.get("input_encoding", "binary spikes"),
        layers=[
            {
                "name": q.name, "kind": q.kind, "scale": q.scale, "readout": q.readout,
                "v_th_mant": q.neuron.v_th_mant, "v_decay": q.neuron.v_decay, "i_decay": q.neuron.i_decay,
            }
            for q in net.layers
        ],
        readout="dense CUBA layer, iDecay 4096, vDecay 0, vThMant 2^17-1: logits = v / 64 after T steps "
        "= sum over T of (W_int @ spikes + bias_int); prediction = argmax",
    )
    return meta


def _write_meta(f: Any, net: QuantizedNet) -> None:
    meta = _meta(net)
    group = f.create_group("meta")
    group.create_dataset("json", data=json.dumps(meta, sort_keys=True))
    group.create_dataset("timesteps", data=np.int64(meta.get("timesteps", 1)))
    group.create_dataset("reset_interval", data=np.int64(meta["reset_interval"]))
    group.create_dataset("input_shape", data=np.asarray(net.input_shape, np.int64))
    group.create_dataset("scales", data=np.asarray([q.scale for q in net.layers], np.float64))
    group.create_dataset("class_names", data=[str(c).encode() for c in meta.get("class_names", [])] or [b""])
    group.create_dataset("tmkt_version", data=str(meta.get("tmkt_version", "")))


def _write_file(f: Any, net: QuantizedNet) -> None:
    """Fill the open h5py file `f` with `net` (layout: module docstring)."""
    layers = f.create_group("layer")

    def new_layer(kind: str) -> Any:
        group = layers.create_group(str(len(layers)))
        group.create_dataset("type", data=np.bytes_(kind))
        return group

    group = new_layer("input")
    group.create_dataset("shape", data=np.asarray(net.input_shape, np.int64))
    _write_neuron(group, INPUT_NEURON)
    for layer in net.layers:
        if layer.flatten:
            new_layer("flatten").create_dataset("shape", data=np.asarray([int(np.prod(layer.in_shape))], np.int64))
        _WRITERS[layer.kind](new_layer(layer.kind), layer)
    _write_meta(f, net)


def write_netx(net: QuantizedNet, path: str | Path) -> Path:
    """Write `net` as netx HDF5 to `path` (atomic: temporary file, then rename), unchecked."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _write_file(f, net)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The tmkt metadata stored in a netx file (`meta/json`)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "meta" not in f or "json" not in f["meta"]:
            raise LavaExportError(f"{path}: no tmkt metadata (meta/json); not a tmkt netx export")
        return json.loads(f["meta/json"][()])


def read_netx(path: str | Path) -> QuantizedNet:
    """Read a netx HDF5 file (input/conv/flatten/dense, CUBA) back into a QuantizedNet."""
    import h5py

    with h5py.File(path, "r") as f:
        meta = json.loads(f["meta/json"][()]) if "meta" in f and "json" in f["meta"] else {}
        groups = f["layer"]
        layers: list[QLayer] = []
        shape: tuple[int, ...] = ()
        input_shape: tuple[int, ...] = ()
        flatten = False
        for i in range(len(groups)):
            group = groups[str(i)]
            kind = _text(group["type"])
            if kind == "input":
                input_shape = shape = tuple(int(s) for s in group["shape"][()])
                neuron = _read_neuron(group["neuron"])
                if neuron != INPUT_NEURON:
                    raise LavaExportError(f"{path}: layer 0: input neuron {neuron} is not the pass-through {INPUT_NEURON}")
            elif kind == "flatten":
                flatten = True
            elif kind in _READERS:
                layers.append(_READERS[kind](group, i, shape, flatten, i == len(groups) - 1))
                shape, flatten = layers[-1].out_shape, False
            else:
                raise LavaExportError(f"{path}: layer {i}: type {kind!r} is not simulated")
    return QuantizedNet(input_shape, layers, meta)  # type: ignore[arg-type]


def _record_check(path: Path, net: QuantizedNet) -> None:
    """Replace `meta/json` of the file at `path` with `net`'s metadata (after a file check)."""
    import h5py

    with h5py.File(path, "a") as f:
        del f["meta/json"]
        f["meta"].create_dataset("json", data=json.dumps(_meta(net), sort_keys=True))


# ---------------------------------------------------------------- checks


def random_spikes(net: QuantizedNet, samples: int, seed: int = 0, rate: float = 0.15) -> np.ndarray:
    """Deterministic random binary input `[T, samples, C, H, W]` for checks."""
    t = int(net.meta.get("timesteps", 4))
    rng = np.random.default_rng(seed)
    return (rng.random((t, samples, *net.input_shape)) < rate).astype(np.uint8)


def check_readback(written: QuantizedNet, read: QuantizedNet) -> None:
    """Raise LavaExportError unless `read` carries exactly the layers of `written`."""
    if tuple(read.input_shape) != tuple(written.input_shape) or len(read.layers) != len(written.layers):
        raise LavaExportError("netx read-back differs from the written network (input shape or layer count)")
    for a, b in zip(written.layers, read.layers):
        same = (
            a.kind == b.kind and np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
            and a.neuron == b.neuron and tuple(a.out_shape) == tuple(b.out_shape) and a.flatten == b.flatten
            and (a.kind == "dense" or a.geometry == b.geometry)
        )
        if not same:
            raise LavaExportError(f"netx read-back differs from the written network at layer {a.name!r}")


def _float_agreement(graph: DeployGraph, net: QuantizedNet, spikes: np.ndarray) -> float:
    """Share of samples where the simulator predicts what the float deploy graph does on `spikes`."""
    import torch

    if not spikes.size:
        return float("nan")
    reference = run_graph(graph, torch.from_numpy(spikes.astype(np.float32)))["logits"].argmax(1).numpy()
    return float((reference == simulate(net, spikes).prediction).mean())


# ---------------------------------------------------------------- export


def export_netx(
    graph: DeployGraph,
    path: str | Path,
    *,
    verify: bool = True,
    source_run: str | Path | None = None,
    lava_check: FileCheck | None = None,
    check_samples: int = 4,
    seed: int = 0,
) -> ExportReport:
    """Write `graph` as a netx HDF5 file for Loihi / lava-dl (8-bit, CUBA); returns its report.

    The bit-accurate simulator runs the quantized network on `check_samples` random spike inputs
    and its agreement with the float deploy graph goes into the file (`meta/json` "check").
    With `verify`, before the file appears: it is read back and must equal what was written,
    and `lava_check` (if given; `tmkt.runtime.lava.lava_check` runs lava-dl itself) runs on it.
    `source_run`: the run directory, recorded so that `tmkt eval FILE` finds the float model.
    Raises LavaExportError naming the layer a netx 0.6.0 / Loihi network cannot take.
    """
    net = quantize_graph(graph)
    if source_run is not None:
        net.meta["source_run"] = str(Path(source_run).resolve())
    net.meta["input_threshold"] = INPUT_THRESHOLD
    net.meta["input_encoding"] = f"binary spikes: 1 where the event frame > {INPUT_THRESHOLD}"
    spikes = random_spikes(net, check_samples, seed)
    agreement = _float_agreement(graph, net, spikes)
    net.meta["check"] = {"samples": int(check_samples), "seed": seed, "float_agreement_random_input": agreement}
    checks = {f"simulator vs float on {check_samples} random inputs": f"{agreement:.0%} agree"}
    figures: dict[str, Any] = {"float_agreement_random_input": agreement, "layers": len(net.layers)}
    path = Path(path)
    with atomic_path(path) as tmp:
        import h5py

        with h5py.File(tmp, "w") as f:
            _write_file(f, net)
        if verify:
            check_readback(net, read_netx(tmp))
            checks["netx read-back"] = "identical"
        if verify and lava_check is not None:
            lava = lava_check(tmp, spikes.transpose(1, 0, 2, 3, 4))
            net.meta["check"]["lava"] = {k: lava[k] for k in ("layers", "spikes", "samples")} | {"identical": True}
            _record_check(tmp, net)
            checks["lava-dl vs simulator"] = "identical"
            figures["lava"] = dict(lava)
        else:
            checks["lava-dl vs simulator"] = "skipped"
    written = f"netx 0.6.0, {len(net.layers)} layers, 8-bit weights, T={net.meta.get('timesteps', '?')}"
    return ExportReport("netx", path, written, checks, figures)
