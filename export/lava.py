"""Export to Loihi: lava-dl netx HDF5 (netx 0.6.0 layout), 8-bit fixed point, CUBA neurons.

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
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tmkt.export.quantize import CubaParams, LavaExportError, QLayer, QuantizedNet, quantize_graph
from tmkt.fileio import atomic_path

FORMAT = "tmkt-netx/1"
INPUT_NEURON = CubaParams(i_decay=4096, v_decay=4096, v_th_mant=0)  # a_in >= 1 -> one spike
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAVA_ENV = Path.home() / ".cache" / "tmkt" / "lava-env"
# Frames (counts, bilinearly resized, so fractional) are rounded to integer counts and the input
# neuron fires on a count >= 1: spike = frame > 0.5. On the built-in digits this keeps the float
# accuracy; "any event" (> 0) smears the resized frames and cost 4 to 16 points.
INPUT_THRESHOLD = 0.5


# ---------------------------------------------------------------- write / read


def _neuron(group: Any, n: CubaParams) -> None:
    g = group.create_group("neuron")
    g.create_dataset("type", data=np.bytes_("CUBA"))
    g.create_dataset("iDecay", data=np.int64(n.i_decay))
    g.create_dataset("vDecay", data=np.int64(n.v_decay))
    g.create_dataset("vThMant", data=np.int64(n.v_th_mant))
    g.create_dataset("refDelay", data=np.int64(n.ref_delay))
    g.create_dataset("gradedSpike", data=np.bool_(False))


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


def write_netx(net: QuantizedNet, path: str | Path) -> Path:
    """Write `net` as netx HDF5 to `path` (atomic: temporary file, then rename)."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        layers = f.create_group("layer")
        idx = 0

        def new(kind: str) -> Any:
            nonlocal idx
            g = layers.create_group(str(idx))
            g.create_dataset("type", data=np.bytes_(kind))
            idx += 1
            return g

        g = new("input")
        g.create_dataset("shape", data=np.asarray(net.input_shape, np.int64))
        _neuron(g, INPUT_NEURON)
        for q in net.layers:
            if q.flatten:
                g = new("flatten")
                g.create_dataset("shape", data=np.asarray([int(np.prod(q.in_shape))], np.int64))
            g = new(q.kind)
            g.attrs["tmkt_name"] = q.name
            g.attrs["scale"] = q.scale
            g.attrs["readout"] = q.readout
            g.create_dataset("shape", data=np.asarray(q.out_shape, np.int64))
            if q.kind == "conv":
                g.create_dataset("inChannels", data=np.int64(q.in_shape[0]))
                g.create_dataset("outChannels", data=np.int64(q.out_shape[0]))
                g.create_dataset("kernelSize", data=np.asarray(q.weight.shape[2:], np.int64))
                for key, val in (("stride", q.stride), ("padding", q.padding), ("dilation", q.dilation)):
                    g.create_dataset(key, data=np.asarray(val, np.int64))
                g.create_dataset("groups", data=np.int64(q.groups))
            else:
                g.create_dataset("inFeatures", data=np.int64(q.weight.shape[1]))
                g.create_dataset("outFeatures", data=np.int64(q.weight.shape[0]))
            g.create_dataset("weight", data=q.weight.astype(np.int32))
            g.create_dataset("bias", data=q.bias.astype(np.int32))
            _neuron(g, q.neuron)
        meta = _meta(net)
        m = f.create_group("meta")
        m.create_dataset("json", data=json.dumps(meta, sort_keys=True))
        m.create_dataset("timesteps", data=np.int64(meta.get("timesteps", 1)))
        m.create_dataset("reset_interval", data=np.int64(meta["reset_interval"]))
        m.create_dataset("input_shape", data=np.asarray(net.input_shape, np.int64))
        m.create_dataset("scales", data=np.asarray([q.scale for q in net.layers], np.float64))
        m.create_dataset("class_names", data=[str(c).encode() for c in meta.get("class_names", [])] or [b""])
        m.create_dataset("tmkt_version", data=str(meta.get("tmkt_version", "")))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The tmkt metadata stored in a netx file (`meta/json`)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "meta" not in f or "json" not in f["meta"]:
            raise LavaExportError(f"{path}: no tmkt metadata (meta/json); not a tmkt netx export")
        return json.loads(f["meta/json"][()])


def _pair(ds: Any) -> tuple[int, int]:
    a = np.atleast_1d(np.asarray(ds[()]))
    return (int(a[0]), int(a[0])) if a.size == 1 else (int(a[0]), int(a[1]))


def _read_neuron(g: Any) -> CubaParams:
    kind = g["type"][()]
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind not in ("CUBA", "LOIHI"):
        raise LavaExportError(f"neuron type {kind!r} is not simulated (only CUBA)")
    return CubaParams(int(g["iDecay"][()]), int(g["vDecay"][()]), int(g["vThMant"][()]), int(g["refDelay"][()]))


def read_netx(path: str | Path) -> QuantizedNet:
    """Read a netx HDF5 file (input/conv/flatten/dense, CUBA) back into a QuantizedNet."""
    import h5py

    with h5py.File(path, "r") as f:
        meta = json.loads(f["meta/json"][()]) if "meta" in f and "json" in f["meta"] else {}
        group = f["layer"]
        layers: list[QLayer] = []
        shape: tuple[int, ...] = ()
        input_shape: tuple[int, ...] = ()
        flatten = False
        for i in range(len(group)):
            g = group[str(i)]
            kind = g["type"][()]
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind == "input":
                input_shape = shape = tuple(int(s) for s in g["shape"][()])
                neuron = _read_neuron(g["neuron"])
                if neuron != INPUT_NEURON:
                    raise LavaExportError(f"{path}: layer 0: input neuron {neuron} is not the pass-through {INPUT_NEURON}")
                continue
            if kind == "flatten":
                flatten = True
                continue
            if kind not in ("conv", "dense"):
                raise LavaExportError(f"{path}: layer {i}: type {kind!r} is not simulated")
            out_shape = tuple(int(s) for s in np.atleast_1d(g["shape"][()]))
            weight = np.asarray(g["weight"][()]).astype(np.int32)
            bias = np.asarray(g["bias"][()]).astype(np.int32) if "bias" in g else np.zeros(out_shape[0 if kind == "conv" else -1], np.int32)
            neuron = _read_neuron(g["neuron"])
            name = str(g.attrs.get("tmkt_name", f"layer{i}"))
            scale = float(g.attrs.get("scale", 1.0))
            readout = bool(g.attrs.get("readout", i == len(group) - 1))
            if kind == "conv":
                layers.append(QLayer(
                    name, kind, weight, bias, shape, out_shape, neuron, scale, readout,
                    _pair(g["stride"]), _pair(g["padding"]), _pair(g["dilation"]), int(np.asarray(g["groups"][()]).ravel()[0]),
                ))
            else:
                weight = weight.reshape(out_shape[-1], -1)
                layers.append(QLayer(name, kind, weight, bias, shape, (int(np.prod(out_shape)),), neuron, scale, readout, flatten=flatten))
            shape, flatten = layers[-1].out_shape, False
    return QuantizedNet(input_shape, layers, meta)  # type: ignore[arg-type]


# ---------------------------------------------------------------- export


def export_lava(run_dir: str | Path, out: str | Path, verify: bool = False, *, lava_env: str | Path | None = None,
                check_samples: int = 4, seed: int = 0) -> Path:
    """Export a run directory to a netx HDF5 file for Loihi / lava-dl; returns the file path.

    Always checked before returning: the file is read back and must equal what was written, and
    the bit-accurate simulator runs it on `check_samples` random spike inputs (agreement of its
    prediction with the float deploy graph on the same binary input goes into `meta/json`
    "check"). With `verify=True`, lava-dl itself (Python 3.10 env, built on first use by
    scripts/lava_env.sh) runs the file and its spikes must equal the simulator's, spike for spike.
    Raises LavaExportError naming the layer a netx 0.6.0 / Loihi network cannot take.
    """
    from tmkt.checkpoint import load_run
    from tmkt.export.graph import GraphError, lower_run, run_graph
    from tmkt.runtime.loihi_sim import simulate

    run = load_run(run_dir)
    try:
        g = lower_run(run)
    except GraphError as e:
        raise LavaExportError(f"cannot export to lava: {e}") from e
    net = quantize_graph(g)
    net.meta["source_run"] = str(Path(run_dir).resolve())
    net.meta["input_threshold"] = INPUT_THRESHOLD
    net.meta["input_encoding"] = f"binary spikes: 1 where the event frame > {net.meta['input_threshold']}"
    spikes = random_spikes(net, check_samples, seed)
    sim = simulate(net, spikes)
    import torch

    ref = run_graph(g, torch.from_numpy(spikes.astype(np.float32))) if spikes.size else None
    agree = float((ref["logits"].argmax(1).numpy() == sim.prediction).mean()) if ref is not None else float("nan")
    net.meta["check"] = {"samples": int(check_samples), "seed": seed, "float_agreement_random_input": agree}
    path = write_netx(net, out)
    check_readback(net, read_netx(path))
    if verify:
        report = verify_with_lava(path, spikes.transpose(1, 0, 2, 3, 4), lava_env=lava_env)
        net.meta["check"]["lava"] = {k: report[k] for k in ("layers", "spikes", "samples")} | {"identical": True}
        path = write_netx(net, out)  # again, now recording the lava-dl check
        check_readback(net, read_netx(path))
    return path


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
            and (a.kind == "dense" or (a.stride, a.padding, a.dilation, a.groups) == (b.stride, b.padding, b.dilation, b.groups))
        )
        if not same:
            raise LavaExportError(f"netx read-back differs from the written network at layer {a.name!r}")


# ---------------------------------------------------------------- lava-dl itself (Python 3.10 env)


def lava_python(env_dir: str | Path | None = None, build: bool = True) -> Path:
    """Python of the lava env (default ~/.cache/tmkt/lava-env), built by scripts/lava_env.sh if absent."""
    env = Path(env_dir) if env_dir else DEFAULT_LAVA_ENV
    py = env / "bin" / "python"
    if (env / ".tmkt-lava-stamp").exists() and py.exists():
        return py
    script = REPO_ROOT / "scripts" / "lava_env.sh"
    if not build or not script.exists():
        raise LavaExportError(f"no lava environment at {env}; build it with: bash scripts/lava_env.sh {env}")
    proc = subprocess.run(["bash", str(script), str(env)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LavaExportError(f"building the lava environment failed:\n{proc.stderr[-2000:]}")
    return py


def run_in_lava(path: str | Path, spikes: np.ndarray, *, lava_env: str | Path | None = None,
                timeout: float = 600.0) -> dict[str, Any]:
    """Run netx file `path` in lava-dl (fixed_pt) on `spikes` `[N, T, C, H, W]`, samples back to back.

    Returns {"spikes": per layer (input first) aligned `[T, N, *shape]` uint8, "readout_v":
    `[N, K]` membrane of the readout after each sample's last frame, "seconds": wall time}.
    """
    from tmkt.runtime.loihi_sim import from_lava_timeline

    py = lava_python(lava_env)
    runner = REPO_ROOT / "scripts" / "lava_run.py"
    if not runner.exists():
        raise LavaExportError(f"{runner} not found: lava verification needs a tmkt source checkout")
    n, t = spikes.shape[:2]
    with tempfile.TemporaryDirectory(prefix="tmkt-lava-") as tmp:
        inp, outp = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, spikes=np.asarray(spikes, np.int32), reset_interval=np.int64(t))
        start = time.perf_counter()
        proc = subprocess.run([str(py), str(runner), str(path), str(inp), str(outp)], capture_output=True, text=True,
                              timeout=timeout)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise LavaExportError(f"lava-dl run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with np.load(outp) as z:
            n_layers = int(z["num_layers"])
            timelines = [z[f"layer{k}"] for k in range(n_layers)]
            v_trace = z["readout_v"]
    aligned = [from_lava_timeline(tl, k, t, n) for k, tl in enumerate(timelines)]
    depth = n_layers - 1
    readout_v = np.stack([v_trace[i * t + t - 1 + depth] for i in range(n)])
    return {"spikes": aligned, "readout_v": readout_v, "seconds": seconds}


def verify_with_lava(path: str | Path, spikes: np.ndarray, *, lava_env: str | Path | None = None) -> dict[str, Any]:
    """lava-dl vs the bit-accurate simulator on `spikes` `[N, T, C, H, W]`: every layer's spikes
    and the readout membrane must be identical; raises LavaExportError naming the first layer
    that differs. Returns {"layers", "spikes", "samples", "lava_seconds"}."""
    from tmkt.runtime.loihi_sim import simulate

    net = read_netx(path)
    sim = simulate(net, np.asarray(spikes).transpose(1, 0, 2, 3, 4))
    lava = run_in_lava(path, spikes, lava_env=lava_env)
    names = ["input"] + [q.name for q in net.layers]
    if len(lava["spikes"]) != len(sim.spikes):
        raise LavaExportError(f"lava built {len(lava['spikes'])} layers, the simulator {len(sim.spikes)}")
    for name, a, b in zip(names, lava["spikes"], sim.spikes):
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = int((a != b).sum()) if a.shape == b.shape else -1
            raise LavaExportError(f"lava-dl and the simulator differ at layer {name!r} ({diff} spikes differ)")
    if not np.array_equal(lava["readout_v"], sim.readout_v[-1]):
        raise LavaExportError("lava-dl and the simulator differ in the readout membrane")
    return {"layers": len(names), "spikes": int(sum(int(s.sum()) for s in sim.spikes)), "samples": int(spikes.shape[0]),
            "lava_seconds": lava["seconds"]}


# ---------------------------------------------------------------- evaluation


def evaluate_netx(path: str | Path, dataset: str | None = None, split: str = "test", *, run_dir: str | Path | None = None,
                  data_root: str | None = None, cache_dir: str | None = None, limit: int | None = None,
                  batch_size: int = 64, seed: int = 0, options: dict | None = None,
                  input_threshold: float | None = None) -> dict[str, Any]:
    """Accuracy of a netx export (bit-accurate simulator) beside its float model.

    The float model is the run directory recorded at export (`meta.source_run`, or `run_dir`);
    it sees the frames as in training. The quantized network sees binary spikes, frame >
    input_threshold (default: the file's `meta.input_threshold`, 0.5).
    Returns {"quantized_accuracy", "float_accuracy" (None without the run), "float_binary_accuracy"
    (float model on the binarized input), "agreement", "readout_in_range", "samples", "seconds",
    "dataset", "split"}.
    """
    import torch

    from tmkt.data.registry import build_data, build_data_for_run
    from tmkt.runtime.loihi_sim import simulate, to_spikes

    meta = read_meta(path)
    net = read_netx(path)
    if input_threshold is None:
        input_threshold = float(meta.get("input_threshold", 0.0))
    name = dataset or meta.get("dataset", "digits")
    t = int(meta["timesteps"])
    size = tuple(meta["input_shape"][1:])
    if split not in ("test", "val", "train"):
        raise ValueError(f"split must be test, val or train, got {split!r}")
    graph, run = None, None
    src = Path(run_dir) if run_dir else (Path(meta["source_run"]) if meta.get("source_run") else None)
    if src is not None and (src / "config.json").exists():
        from tmkt.checkpoint import load_run
        from tmkt.export.graph import lower_run

        run = load_run(src)
        graph = lower_run(run)
    if run is not None:  # the data the run was trained and tested on
        bundle = build_data_for_run(run.config, dataset=name, data_root=data_root, cache_dir=cache_dir, options=options)
    else:  # only the file: its binning, the given seed
        if options is None:
            options = {k: meta["binning"][k] for k in ("by", "binary") if k in meta.get("binning", {})}
        bundle = build_data(name, timesteps=t, input_size=size, data_root=data_root, cache_dir=cache_dir, seed=seed,
                            options=options or None)
    ds = getattr(bundle, split)
    n_total = len(ds) if limit is None else min(limit, len(ds))
    q_ok = f_ok = fb_ok = agree = in_range = 0
    start = time.perf_counter()
    for lo in range(0, n_total, batch_size):
        items = [ds[i] for i in range(lo, min(lo + batch_size, n_total))]
        frames = np.stack([np.asarray(it[-2] if len(it) == 3 else it[0], np.float32) for it in items], axis=1)
        labels = np.asarray([int(it[-1]) for it in items])
        spikes = to_spikes(frames, input_threshold)
        sim = simulate(net, spikes)
        q_ok += int((sim.prediction == labels).sum())
        in_range += int(sim.readout_in_range.sum())
        if graph is not None:
            from tmkt.export.graph import run_graph

            f_pred = run_graph(graph, torch.from_numpy(frames))["logits"].argmax(1).numpy()
            fb_pred = run_graph(graph, torch.from_numpy(spikes.astype(np.float32)))["logits"].argmax(1).numpy()
            f_ok += int((f_pred == labels).sum())
            fb_ok += int((fb_pred == labels).sum())
            agree += int((fb_pred == sim.prediction).sum())
    n = max(n_total, 1)
    return {
        "dataset": name, "split": split, "samples": n_total,
        "quantized_accuracy": q_ok / n,
        "float_accuracy": f_ok / n if graph is not None else None,
        "float_binary_accuracy": fb_ok / n if graph is not None else None,
        "agreement": agree / n if graph is not None else None,
        "readout_in_range": in_range / n, "input_threshold": input_threshold,
        "seconds": time.perf_counter() - start,
    }
