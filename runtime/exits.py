"""Every exit of one run on the same test split: the float model, ONNX (onnxruntime), netx (the
chip's readout, bit-accurate simulator), int8 ONNX (the netx integers in onnxruntime) and NIR in
norse, snntorch and sinabs, with each one's agreement with the float model. `tmkt eval RUN
--exits` prints it as one table.

Each exit is written to a temporary folder by its own exporter (as `tmkt export` does, checks
included), then run on the frames every exit is fed: the binned test recordings, which for a
Loihi-bound run (binary frames, binning resize "events") are exactly the chip's input spikes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tmkt.export.graph import lower_run, run_graph
from tmkt.runtime.nir_frameworks import FLAVOR, FRAMEWORKS, NirFrameworkError, compare_framework


def _test_frames(run, split: str, cache_dir: str | None, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from tmkt.data.registry import build_data_for_run

    data = getattr(build_data_for_run(run.config, cache_dir=cache_dir), split)
    n = len(data) if limit is None else min(limit, len(data))
    frames = np.stack([np.asarray(data[i][0], np.float32) for i in range(n)], axis=1)
    return frames, np.asarray(data.labels[:n])


def _row(name: str, pred: np.ndarray, labels: np.ndarray, float_pred: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"exit": name, "accuracy": float((pred == labels).mean()),
            "agreement_with_float": float((pred == float_pred).mean()), **extra}


def evaluate_exits(run_dir: str | Path, *, split: str = "test", frameworks: tuple[str, ...] = FRAMEWORKS,
                   cache_dir: str | None = None, limit: int | None = None, batch: int = 64) -> dict[str, Any]:
    """Accuracy of every exit of the run at `run_dir` on its `split` (see the module docstring).

    Returns {"run", "split", "samples", "rows": [{"exit", "accuracy", "agreement_with_float", ...}]};
    a framework that cannot run gets a row with "error" instead of figures.
    """
    import torch

    from tmkt.checkpoint import load_run
    from tmkt.export.netx import INPUT_THRESHOLD, calibration_from_run, export_netx, read_netx
    from tmkt.export.netx_sim import simulate, to_spikes
    from tmkt.export.nir import export_nir
    from tmkt.export.onnx import export_onnx
    from tmkt.export.onnx_int8 import export_onnx_int8

    start = time.perf_counter()
    run = load_run(run_dir)
    graph = lower_run(run)
    frames, labels = _test_frames(run, split, cache_dir, limit)
    float_pred = np.concatenate([
        run_graph(graph, torch.from_numpy(frames[:, i:i + batch]))["logits"].argmax(1).numpy()
        for i in range(0, frames.shape[1], batch)
    ])
    rows = [_row("float (PyTorch deploy graph)", float_pred, labels, float_pred)]
    with tempfile.TemporaryDirectory(prefix="tmkt-exits-") as tmp:
        import onnxruntime as ort

        onnx_path = export_onnx(graph, Path(tmp) / "model.onnx").path
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        onnx_pred = np.concatenate([sess.run(None, {"events": frames[:, i:i + batch]})[0].argmax(1)
                                    for i in range(0, frames.shape[1], batch)])
        rows.append(_row("ONNX (onnxruntime)", onnx_pred, labels, float_pred))

        calibration = calibration_from_run(run)
        netx = export_netx(graph, Path(tmp) / "model.net", calibration=calibration)
        net = read_netx(netx.path)
        sim_pred, in_range = [], []
        for i in range(0, frames.shape[1], batch):
            sim = simulate(net, to_spikes(frames[:, i:i + batch], net.meta.get("input_threshold", INPUT_THRESHOLD)),
                           keep_spikes=False)
            sim_pred.append(sim.prediction)
            in_range.append(sim.readout_in_range)
        chip_pred = np.concatenate(sim_pred)
        rows.append(_row("netx (Loihi chip readout, simulator)", chip_pred, labels, float_pred,
                         readout_in_range=float(np.concatenate(in_range).mean())))

        # the same quantizer and calibration as the netx file: the same integers, on the CPU
        int8_path = export_onnx_int8(graph, Path(tmp) / "model.int8.onnx", calibration=calibration).path
        sess8 = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
        int8_pred = np.concatenate([sess8.run(["logits"], {"events": frames[:, i:i + batch]})[0].argmax(1)
                                    for i in range(0, frames.shape[1], batch)])
        rows.append(_row("ONNX int8 (onnxruntime, the netx integers)", int8_pred, labels, float_pred,
                         chip_agreement=float((int8_pred == chip_pred).mean())))

        files: dict[str, Path] = {}
        for fw in frameworks:
            flavor = FLAVOR[fw]
            try:
                if flavor not in files:
                    files[flavor] = export_nir(graph, Path(tmp) / f"model-{flavor}.nir", flavor=flavor).path
                cmp = compare_framework(graph, fw, files[flavor], frames, labels)
            except (NirFrameworkError, OSError) as e:
                rows.append({"exit": f"NIR in {fw}", "error": str(e).splitlines()[0]})
                continue
            pred_agree = cmp["prediction_agreement"]
            rows.append({"exit": f"NIR in {fw}" + ("" if flavor == "default" else f" ({flavor} file)"),
                         "accuracy": cmp["accuracy"], "agreement_with_float": pred_agree,
                         "spikes_identical": cmp["spikes_identical"],
                         "spike_differences": int(sum(max(d, 0) for d in cmp["spike_differences"].values())),
                         "spikes": int(sum(cmp["spikes"].values())), "max_abs_logit_diff": cmp["max_abs_logit_diff"]})
    return {"run": str(run_dir), "split": split, "samples": int(len(labels)), "rows": rows,
            "seconds": time.perf_counter() - start}
