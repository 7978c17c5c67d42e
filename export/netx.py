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

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tmkt.export.graph import DeployGraph, as_pair, run_graph
from tmkt.export.netx_sim import simulate, to_spikes
from tmkt.export.quantize import (
    VTH_MAX,
    ConvGeometry,
    CubaParams,
    LavaExportError,
    QLayer,
    QuantizedNet,
    quantize_graph,
)
from tmkt.export.report import ExportReport
from tmkt.fileio import atomic_bytes, atomic_write_bytes, fill

FORMAT = "tmkt-netx/1"
INPUT_NEURON = CubaParams(i_decay=4096, v_decay=4096, v_th_mant=0)  # a_in >= 1 -> one spike
# The input neuron fires on a count >= 1: spike = frame > 0.5. Binary frames binned at the training
# size (binning "resize": "events", the default) pass unchanged, so the chip sees exactly the training
# input; bilinearly resized frames (legacy "frames") are rounded to integer counts first.
INPUT_THRESHOLD = 0.5
CALIBRATION_SAMPLES = 512  # training samples whose spikes set the readout's range


class InputMismatchWarning(UserWarning):
    """The run was trained on frames that are not the binary spikes Loihi is fed."""

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


_UNDIGESTED = ("content_sha256", "check")  # the digest itself; check results added after the write


def net_digest(net: QuantizedNet, meta: dict[str, Any] | None = None) -> str:
    """sha256 over everything the simulator and lava-dl read of `net` (shapes, geometry, CUBA
    parameters, integer weights and biases) and its metadata `meta` (T, class names, binning...;
    default `net.meta`), stored in `meta/json` as "content_sha256" and checked by `read_netx`:
    a damaged file never simulates as if it were the exported network."""
    meta = net.meta if meta is None else meta
    described = {k: v for k, v in meta.items() if k not in _UNDIGESTED}
    h = hashlib.sha256(json.dumps([list(map(int, net.input_shape)), described], sort_keys=True).encode())
    for q in net.layers:
        g = q.geometry
        head = [q.name, q.kind, list(map(int, q.in_shape)), list(map(int, q.out_shape)), bool(q.flatten),
                [list(g.stride), list(g.padding), list(g.dilation), int(g.groups)], float(q.scale), bool(q.readout),
                [int(q.neuron.i_decay), int(q.neuron.v_decay), int(q.neuron.v_th_mant), int(q.neuron.ref_delay)],
                list(q.weight.shape)]
        h.update(json.dumps(head).encode())
        h.update(np.ascontiguousarray(q.weight, np.int32).tobytes())
        h.update(np.ascontiguousarray(q.bias, np.int32).tobytes())
    return h.hexdigest()


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
    meta["content_sha256"] = net_digest(net, meta)
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


def netx_image(net: QuantizedNet) -> bytes:
    """The netx HDF5 file of `net` as bytes, built in memory: h5py never writes to a disk, so a
    full disk is one plain write error (`tmkt.fileio.WriteError`) and never reaches HDF5's own
    error paths (which crash the process in its close)."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        _write_file(f, net)
    return buf.getvalue()


def write_netx(net: QuantizedNet, path: str | Path) -> Path:
    """Write `net` as netx HDF5 to `path` (atomic: temporary file, then rename), unchecked.
    A second writer of the same path at once is refused (`tmkt.fileio.LockedError`)."""
    path = Path(path)
    atomic_write_bytes(path, netx_image(net), exclusive=True)
    return path


# what a damaged or foreign file makes h5py, numpy and the readers raise
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError, UnicodeDecodeError,
                OverflowError, RecursionError, RuntimeError)
MAX_INPUT_VALUES = 2**24  # C x H x W of the input; more is a damaged file, not a network to simulate
MAX_WEIGHTS = 2**28


def read_meta(path: str | Path) -> dict[str, Any]:
    """The tmkt metadata stored in a netx file (`meta/json`)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "meta" not in f or "json" not in f["meta"]:
                raise LavaExportError(f"{path}: no tmkt metadata (meta/json); not a tmkt netx export")
            meta = json.loads(f["meta/json"][()])
    except LavaExportError:
        raise
    except (*_READ_ERRORS, json.JSONDecodeError) as e:
        raise LavaExportError(f"{path}: not a readable netx file ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(meta, dict):
        raise LavaExportError(f"{path}: meta/json must be a JSON object")
    return meta


def read_netx(path: str | Path) -> QuantizedNet:
    """Read a netx HDF5 file (input/conv/flatten/dense, CUBA) back into a QuantizedNet.
    A damaged or foreign file raises LavaExportError naming it (and the layer where known);
    shapes are checked layer to layer (`check_net`), so what loads can be simulated."""
    try:
        net = _read_netx(path)
    except LavaExportError as e:
        raise e if str(e).startswith(str(path)) else LavaExportError(f"{path}: {e}") from None
    except (*_READ_ERRORS, json.JSONDecodeError) as e:
        raise LavaExportError(f"{path}: not a readable netx file ({type(e).__name__}: {str(e)[:160]})") from None
    check_net(net, path)
    stored = net.meta.get("content_sha256")
    if stored is not None and stored != net_digest(net):
        raise LavaExportError(f"{path}: layers do not match the content_sha256 in meta/json (damaged file)")
    return net


def _read_netx(path: str | Path) -> QuantizedNet:
    import h5py

    with h5py.File(path, "r") as f:
        meta = json.loads(f["meta/json"][()]) if "meta" in f and "json" in f["meta"] else {}
        if not isinstance(meta, dict):
            raise LavaExportError("meta/json must be a JSON object")
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
                if len(shape) != 3 or min(shape) < 1 or int(np.prod(shape)) > MAX_INPUT_VALUES:
                    raise LavaExportError(f"layer {i}: input shape {shape} is not (C, H, W) of a usable size")
                neuron = _read_neuron(group["neuron"])
                if neuron != INPUT_NEURON:
                    raise LavaExportError(f"layer 0: input neuron {neuron} is not the pass-through {INPUT_NEURON}")
            elif kind == "flatten":
                flatten = True
            elif kind in _READERS:
                if not shape:
                    raise LavaExportError(f"layer {i}: a {kind} layer before the input layer")
                layers.append(_READERS[kind](group, i, shape, flatten, i == len(groups) - 1))
                shape, flatten = layers[-1].out_shape, False
            else:
                raise LavaExportError(f"layer {i}: type {kind!r} is not simulated")
    return QuantizedNet(input_shape, layers, meta)  # type: ignore[arg-type]


def check_net(net: QuantizedNet, path: str | Path) -> None:
    """Raise LavaExportError naming `path` and the layer unless every layer's weight, bias and
    shapes fit its input (what the simulator and lava-dl need to run the file)."""
    if not net.layers:
        raise LavaExportError(f"{path}: no synaptic layers")
    t = net.meta.get("timesteps", 1)
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 100_000:
        raise LavaExportError(f"{path}: meta/json field 'timesteps' must be an integer in 1..100000, got {t!r}"[:200])
    total = 0
    for i, q in enumerate(net.layers, start=1):
        where = f"{path}: layer {q.name!r}"
        w = q.weight
        total += w.size
        if total > MAX_WEIGHTS:
            raise LavaExportError(f"{where}: over {MAX_WEIGHTS:,} weights in all; not a network to simulate")
        n_out = w.shape[0] if w.ndim else 0
        if q.bias.shape != (n_out,):
            raise LavaExportError(f"{where}: bias of shape {q.bias.shape} for {n_out} outputs")
        nrn = q.neuron
        if not (0 <= nrn.i_decay <= 4096 and 0 <= nrn.v_decay <= 4096 and 0 <= nrn.v_th_mant < 2**17
                and 0 <= nrn.ref_delay < 2**16):
            raise LavaExportError(f"{where}: CUBA parameters {nrn} outside Loihi's ranges")
        if q.kind == "dense":
            if w.ndim != 2 or w.shape[1] != int(np.prod(q.in_shape)):
                raise LavaExportError(f"{where}: dense weight {w.shape} does not take the {q.in_shape} input")
            continue
        g = q.geometry
        if w.ndim != 4 or len(q.in_shape) != 3 or g.groups < 1 or w.shape[0] % g.groups or w.shape[1] * g.groups != q.in_shape[0]:
            raise LavaExportError(f"{where}: conv weight {w.shape} (groups {g.groups}) does not take the {q.in_shape} input")
        if min(g.stride) < 1 or min(g.dilation) < 1 or min(g.padding) < 0:
            raise LavaExportError(f"{where}: stride, dilation and padding must be positive, got {g}")
        out = [w.shape[0]]
        for size, k, s, p, d in zip(q.in_shape[1:], w.shape[2:], g.stride, g.padding, g.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        if tuple(out) != tuple(q.out_shape) or min(out) < 1:
            raise LavaExportError(f"{where}: stored output shape {tuple(q.out_shape)}, the convolution gives {tuple(out)}")


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


def calibration_from_run(run: Any, samples: int = CALIBRATION_SAMPLES, split: str = "train") -> np.ndarray:
    """Binary input spikes `[T, N, C, H, W]` of up to `samples` event recordings of a run's
    `split` (rebuilt from its config: the frames it was trained on), for `export_netx(calibration=)`."""
    from tmkt.data.registry import build_data_for_run

    data = getattr(build_data_for_run(run.config), split)
    events = getattr(data, "events", data)  # training pairs hold their event set
    n = min(int(samples), len(events))
    idx = np.linspace(0, len(events) - 1, n).round().astype(int) if n else np.zeros(0, int)  # spread over classes
    frames = [np.asarray(events.frames(i) if hasattr(events, "frames") else events[i][0], np.float32) for i in idx]
    return to_spikes(np.stack(frames, axis=1), INPUT_THRESHOLD)


def input_mismatch(meta: dict[str, Any]) -> str | None:
    """Why the frames a run was trained on differ from the chip's binary spikes, or None."""
    binning = meta.get("binning") or {}
    if not binning:
        return None
    if not binning.get("binary", False):
        return "it was trained on event counts, the chip gets binary spikes (frame > 0.5)"
    if binning.get("resize", "frames") != "events" and tuple(meta.get("input_shape", (0, 0, 0)))[1:] != tuple(
        meta.get("sensor_size", (0, 0))[:2][::-1]
    ):
        return "its binary frames were resized bilinearly (binning resize 'frames'), the chip gets them rounded"
    return None


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
    calibration: np.ndarray | None = None,
) -> ExportReport:
    """Write `graph` as a netx HDF5 file for Loihi / lava-dl (8-bit, CUBA); returns its report.

    `calibration`: binary input spikes `[T, N, C, H, W]` of training samples
    (`calibration_from_run`); the readout is scaled so that its membrane stays inside the 24-bit
    range and under threshold for T steps (`tmkt.export.quantize.readout_scale`); without it, for
    the worst case of any input. On the calibration spikes every readout membrane must stay in
    range, else ReadoutRangeError (as when the readout would keep fewer than 5 weight bits).
    The bit-accurate simulator runs the quantized network on `check_samples` random spike inputs
    (and as many calibration samples) and its agreement with the float deploy graph goes into the
    file (`meta/json` "check"). With `verify`, before the file appears: it is read back and must
    equal what was written, and `lava_check` (if given; `tmkt.runtime.lava.lava_check` runs
    lava-dl itself) runs on the same real and random inputs.
    `source_run`: the run directory, recorded so that `tmkt eval FILE` finds the float model.
    Raises LavaExportError naming the layer a netx 0.6.0 / Loihi network cannot take. Warns
    (InputMismatchWarning) when the run was trained on frames other than the chip's binary spikes.
    """
    mismatch = input_mismatch(graph.meta)
    if mismatch:
        warnings.warn(f"Loihi export: {mismatch}; accuracy on the chip will differ from the float model's "
                      "(train with binary frames and binning resize 'events', the defaults)", InputMismatchWarning,
                      stacklevel=2)
    net = quantize_graph(graph, calibration)
    if source_run is not None:
        net.meta["source_run"] = str(Path(source_run).resolve())
    net.meta["input_threshold"] = INPUT_THRESHOLD
    net.meta["input_encoding"] = f"binary spikes: 1 where the event frame > {INPUT_THRESHOLD}"
    spikes = random_spikes(net, check_samples, seed)
    checks: dict[str, str] = {}
    figures: dict[str, Any] = {"layers": len(net.layers), "readout_range": net.meta["readout_range"]}
    if calibration is not None:
        # the readout run by the simulator on the calibration's hidden spikes (quantize_graph has them)
        out, samples = int(net.meta["readout_range"]["calibration_out_of_range"]), int(calibration.shape[1])
        figures["calibration_readout_in_range"] = 1.0 - out / max(samples, 1)
        if out:
            raise LavaExportError(  # quantize_readout bounds it; reaching this is a bug, never a silent file
                f"readout: {out} of {samples} calibration samples leave the 24-bit range (limit {VTH_MAX} x 64)"
            )
        checks[f"readout in range on {calibration.shape[1]} calibration samples"] = "all"
        real = np.asarray(calibration[:, :check_samples], np.uint8)
        spikes = np.concatenate([real, spikes], axis=1)
    agreement = _float_agreement(graph, net, spikes)
    net.meta["check"] = {"samples": int(spikes.shape[1]), "seed": seed, "float_agreement": agreement,
                         "real_samples": 0 if calibration is None else int(min(check_samples, calibration.shape[1]))}
    checks[f"simulator vs float on {spikes.shape[1]} inputs"] = f"{agreement:.0%} agree"
    figures["float_agreement"] = agreement
    path = Path(path)
    # built in memory, written by a plain write (a full disk is one named error), locked against a
    # second writer of `path`, checked in place before the rename
    with atomic_bytes(path, netx_image(net), exclusive=True) as tmp:
        if verify:
            check_readback(net, read_netx(tmp))
            checks["netx read-back"] = "identical"
        if verify and lava_check is not None:
            lava = lava_check(tmp, spikes.transpose(1, 0, 2, 3, 4))
            net.meta["check"]["lava"] = {k: lava[k] for k in ("layers", "spikes", "samples")} | {"identical": True}
            fill(tmp, netx_image(net))  # the same file with the lava-dl check in meta/json
            checks["lava-dl vs simulator"] = f"identical ({lava['samples']} of {spikes.shape[1]} check samples)"
            figures["lava"] = dict(lava)
        else:
            checks["lava-dl vs simulator"] = "skipped"
    written = f"netx 0.6.0, {len(net.layers)} layers, 8-bit weights, T={net.meta.get('timesteps', '?')}"
    return ExportReport("netx", path, written, checks, figures)
