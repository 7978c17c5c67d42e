"""The accuracy of an exported ONNX file (float or int8) on its run's data, beside the float model it
came from. `tmkt eval MODEL.onnx` calls this.

The file runs through `EventClassifier` (onnxruntime, CPU), as `tmkt infer` runs it, on the binned
recordings of the run's split. The float model (the run's PyTorch deploy graph) sees the same
frames; an int8 file binarizes them (frame > 0.5, as the Loihi export), so its agreement is
taken against the float model on those binary frames, which for a Loihi-bound run (binary
frames, binning resize "events") are exactly what it was trained on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from tmkt.errors import TmktError

SPLITS = ("test", "val")


class OnnxEvalError(TmktError, ValueError):
    """An ONNX file that cannot be evaluated as asked (no source run, bad split)."""


def _source_run(path: Path, meta: dict[str, Any], run_dir: str | Path | None):
    from tmkt.checkpoint import load_run

    src = Path(run_dir) if run_dir else (Path(meta["source_run"]) if meta.get("source_run") else None)
    if src is None or not (src / "config.json").exists():
        where = f"its source run {src} is gone" if src is not None else "it records no source run (exported before int8 files did)"
        raise OnnxEvalError(f"{path}: cannot find the run this file was exported from ({where}); pass the run directory")
    return load_run(src)


def evaluate_onnx(path: str | Path, split: str = "test", *, run_dir: str | Path | None = None,
                  cache_dir: str | None = None, limit: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy of the ONNX file at `path` on its run's `split`, beside the float model.

    Returns {"path", "precision" ("float32" | "int8"), "mode", "split", "samples", "accuracy",
    "float_accuracy", "float_binary_accuracy" (float model on the file's binary input; None for a
    float file), "agreement" (argmax equal to the float model's on the same input), "seconds"}.
    """
    import torch

    from tmkt.data.registry import build_data_for_run
    from tmkt.export.graph import lower_run, run_graph
    from tmkt.export.netx_sim import to_spikes
    from tmkt.export.onnx import read_onnx_metadata
    from tmkt.runtime.classifier import EventClassifier

    if split not in SPLITS:
        raise OnnxEvalError(f"split must be test or val, got {split!r}")
    path = Path(path)
    meta = read_onnx_metadata(path)
    run = _source_run(path, meta, run_dir)
    precision = str(meta.get("precision", "float32"))
    threshold = meta.get("input_threshold") if precision == "int8" else None
    data = getattr(build_data_for_run(run.config, cache_dir=cache_dir), split)
    n = len(data) if limit is None else min(int(limit), len(data))
    start = time.perf_counter()
    clf = EventClassifier(path, provider="cpu")
    graph = lower_run(run)
    counts = dict.fromkeys(("file", "float", "float_binary", "agree"), 0)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(lo + batch_size, n))
        frames = np.stack([np.asarray(data[i][0], np.float32) for i in idx], axis=1)
        labels = np.asarray([int(data.labels[i]) for i in idx])
        pred = clf.logits(frames).mean(0).argmax(1)
        float_pred = run_graph(graph, torch.from_numpy(frames))["logits"].argmax(1).numpy()
        same_input = float_pred
        if threshold is not None:
            binary = torch.from_numpy(to_spikes(frames, float(threshold)).astype(np.float32))
            same_input = run_graph(graph, binary)["logits"].argmax(1).numpy()
            counts["float_binary"] += int((same_input == labels).sum())
        counts["file"] += int((pred == labels).sum())
        counts["float"] += int((float_pred == labels).sum())
        counts["agree"] += int((pred == same_input).sum())
    total = max(n, 1)
    return {
        "path": str(path), "precision": precision, "mode": meta["mode"], "split": split, "samples": n,
        "accuracy": counts["file"] / total, "float_accuracy": counts["float"] / total,
        "float_binary_accuracy": counts["float_binary"] / total if threshold is not None else None,
        "agreement": counts["agree"] / total, "seconds": time.perf_counter() - start,
    }
