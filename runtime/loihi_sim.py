"""Loihi on the host: the accuracy of a netx export on a data set, with the bit-accurate simulator
(`tmkt.export.netx_sim`) beside the float model it came from. `tmkt eval FILE.net` calls this."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from tmkt.errors import TmktError
from tmkt.export.graph import DeployGraph, lower_run, run_graph
from tmkt.export.netx import read_meta, read_netx
from tmkt.export.netx_sim import simulate, to_spikes

SPLITS = ("test", "val", "train")


class NetxEvalError(TmktError, ValueError):
    """A netx file that cannot be evaluated as asked (split, data set, missing metadata)."""


def _source_run(meta: dict[str, Any], run_dir: str | Path | None):
    """The run the file was exported from (`run_dir`, else `meta.source_run`), or None."""
    from tmkt.checkpoint import load_run

    src = Path(run_dir) if run_dir else (Path(meta["source_run"]) if meta.get("source_run") else None)
    if src is None or not (src / "config.json").exists():
        return None
    return load_run(src)


def _data_bundle(meta: dict[str, Any], run, name: str, data_root, cache_dir, seed: int, options: dict | None):
    """The data the run was trained and tested on; without the run, the file's binning and `seed`."""
    from tmkt.data.registry import build_data, build_data_for_run

    try:
        if run is not None:
            return build_data_for_run(run.config, dataset=name, data_root=data_root, cache_dir=cache_dir, options=options)
        if options is None:
            options = {k: meta["binning"][k] for k in ("by", "binary") if k in meta.get("binning", {})}
        return build_data(name, timesteps=int(meta["timesteps"]), input_size=tuple(meta["input_shape"][1:]),
                          data_root=data_root, cache_dir=cache_dir, seed=seed, options=options or None)
    except (ValueError, KeyError) as e:  # the data package reports a bad name or option as ValueError
        raise NetxEvalError(f"data set {name!r}: {e}") from e


def evaluate_netx(path: str | Path, dataset: str | None = None, split: str = "test", *, run_dir: str | Path | None = None,
                  data_root: str | None = None, cache_dir: str | None = None, limit: int | None = None,
                  batch_size: int = 64, seed: int = 0, options: dict | None = None,
                  input_threshold: float | None = None, lava_samples: int = 0,
                  lava_env: str | Path | None = None) -> dict[str, Any]:
    """Accuracy of a netx export (bit-accurate simulator) beside its float model.

    The float model is the run directory recorded at export (`meta.source_run`, or `run_dir`);
    it sees the frames as in training. The quantized network sees binary spikes, frame >
    input_threshold (default: the file's `meta.input_threshold`, 0.5).
    `quantized_accuracy` is what the chip reports: the argmax of the readout membrane after T
    steps; `exact_sum_accuracy` the argmax of the exact integer logit sum (equal where the
    readout stayed in range). `lava_samples` > 0 also runs the first that many samples through
    lava-dl itself (the Python 3.10 lava env) and compares its readout argmax with the
    simulator's, sample for sample ("lava": {"samples", "agree", "identical_membrane"}).
    Returns {"quantized_accuracy", "exact_sum_accuracy", "float_accuracy" (None without the run),
    "float_binary_accuracy" (float model on the binarized input), "agreement", "readout_in_range",
    "samples", "seconds", "dataset", "split"[, "lava"]}.
    """
    if split not in SPLITS:
        raise NetxEvalError(f"split must be test, val or train, got {split!r}")
    meta = read_meta(path)
    if input_threshold is None:
        input_threshold = float(meta.get("input_threshold", 0.0))
    name = dataset or meta.get("dataset", "digits")
    run = _source_run(meta, run_dir)
    graph = lower_run(run) if run is not None else None
    samples = getattr(_data_bundle(meta, run, name, data_root, cache_dir, seed, options), split)
    n_total = len(samples) if limit is None else min(limit, len(samples))
    start = time.perf_counter()
    net = read_netx(path)
    counts = _count_correct(net, graph, samples, n_total, batch_size, input_threshold)
    n = max(n_total, 1)
    with_float = graph is not None
    result = {
        "dataset": name, "split": split, "samples": n_total,
        "quantized_accuracy": counts["quantized"] / n, "exact_sum_accuracy": counts["exact"] / n,
        "float_accuracy": counts["float"] / n if with_float else None,
        "float_binary_accuracy": counts["float_binary"] / n if with_float else None,
        "agreement": counts["agree"] / n if with_float else None,
        "readout_in_range": counts["in_range"] / n, "input_threshold": input_threshold,
        "seconds": time.perf_counter() - start,
    }
    if lava_samples > 0:
        result["lava"] = lava_agreement(path, net, samples, min(lava_samples, n_total), input_threshold, lava_env)
    return result


def _frames_labels(items: list) -> tuple[np.ndarray, np.ndarray]:
    """Frames `[T, B, C, H, W]` and labels of dataset items; training splits yield (static,
    events, label), the others (events, label)."""
    frames = np.stack([np.asarray(it[-2] if len(it) == 3 else it[0], np.float32) for it in items], axis=1)
    return frames, np.asarray([int(it[-1]) for it in items])


def lava_agreement(path: str | Path, net, samples, n: int, input_threshold: float,
                   lava_env: str | Path | None = None) -> dict[str, Any]:
    """The first `n` samples through lava-dl (fixed_pt) and the simulator: how many readout
    argmaxes agree, and whether the readout membranes are identical."""
    from tmkt.runtime.lava import run_in_lava

    frames, labels = _frames_labels([samples[i] for i in range(n)])
    spikes = to_spikes(frames, input_threshold)
    sim = simulate(net, spikes)
    lava = run_in_lava(path, spikes.transpose(1, 0, 2, 3, 4), lava_env=lava_env, timeout=600.0 + 60.0 * n)
    lava_pred = lava["readout_v"].argmax(axis=1)
    return {
        "samples": int(n), "agree": int((lava_pred == sim.prediction).sum()),
        "identical_membrane": bool(np.array_equal(lava["readout_v"], sim.readout_v[-1])),
        "lava_correct": int((lava_pred == labels).sum()), "seconds": lava["seconds"],
    }


def _count_correct(net, graph: DeployGraph | None, samples, n_total: int, batch_size: int,
                   input_threshold: float) -> dict[str, int]:
    """Correct predictions of the simulator and (with `graph`) of the float model, in batches."""
    import torch

    counts = dict.fromkeys(("quantized", "exact", "float", "float_binary", "agree", "in_range"), 0)
    for lo in range(0, n_total, batch_size):
        frames, labels = _frames_labels([samples[i] for i in range(lo, min(lo + batch_size, n_total))])
        spikes = to_spikes(frames, input_threshold)
        sim = simulate(net, spikes, keep_spikes=False)
        counts["quantized"] += int((sim.prediction == labels).sum())
        counts["exact"] += int((sim.exact_prediction == labels).sum())
        counts["in_range"] += int(sim.readout_in_range.sum())
        if graph is not None:
            float_pred = run_graph(graph, torch.from_numpy(frames))["logits"].argmax(1).numpy()
            binary_pred = run_graph(graph, torch.from_numpy(spikes.astype(np.float32)))["logits"].argmax(1).numpy()
            counts["float"] += int((float_pred == labels).sum())
            counts["float_binary"] += int((binary_pred == labels).sum())
            counts["agree"] += int((binary_pred == sim.prediction).sum())
    return counts
