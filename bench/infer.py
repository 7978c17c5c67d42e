"""onnxruntime vs PyTorch eager for exported tmkt models, and streaming events/s vs a DAVIS346.

Run: python bench/infer.py [--threads 1] [--quick]

For the built-in small model (32x32, T=8, 10 classes) and the VGG-SNN (48x48, T=10, 101
classes), both randomly initialised with random BN statistics (timing does not depend on
training), it measures on this CPU with `--threads` threads for every engine:

- dense multiply-accumulates per sample (conv + dense over T steps), to judge how close to the
  core's arithmetic peak each engine runs;
- latency at batch 1 (median over repeats) and throughput at batch 32 (samples/s) of
  onnxruntime (unrolled model, CPU provider), the PyTorch deploy-graph module
  (`tmkt.export.onnx.UnrolledModel`, eager) and the spikingjelly network (eager);
- sustained streaming inference: the stream model through `EventClassifier.stream` (binning +
  T steps per 50 ms window, membranes carried), fed a DAVIS346 (346x260) recording at its
  12 Mev/s peak rate; events/s processed, and the real-time factor (recording time /
  processing time; > 1 keeps up).

Inputs are binary event frames with 30% density; ratios are from one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DAVIS346 = (346, 260, 2)
DAVIS_PEAK_EV_S = 12e6

MODELS = {
    "small": dict(backbone="small", input_size=(32, 32), timesteps=8, num_classes=10),
    "vgg": dict(backbone="vgg", input_size=(48, 48), timesteps=10, num_classes=101),
}


def build(name: str, tmp: Path):
    """A randomly initialised run of model `name`: (spikingjelly model, deploy graph)."""
    from tmkt.checkpoint import load_run, save_run
    from tmkt.export.graph import lower_run
    from tmkt.models import ModelConfig, build_model, randomize_batchnorm

    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=spec["backbone"], num_classes=spec["num_classes"], input_size=spec["input_size"]))
    randomize_batchnorm(model, 0)
    data = {
        "name": "bench",
        "class_names": [f"c{k}" for k in range(spec["num_classes"])],
        "sensor_size": list(DAVIS346),
        "input_size": list(spec["input_size"]),
        "timesteps": spec["timesteps"],
        "binning": {"by": "time", "binary": False, "shift_to_origin": False},
    }
    run = load_run(save_run(tmp / name, model, {"data": data, "method": {"name": "bench"}, "train": {}, "metrics": {}}))
    return run.model, lower_run(run)


def macs_per_sample(graph) -> int:
    """Multiply-accumulates of one sample (all T steps) if run densely: conv and dense layers."""
    from tmkt.export.graph import Conv2d, Dense

    total = 0
    for name, node in graph.nodes.items():
        if isinstance(node, Conv2d):
            _, h, w = graph.shapes[name]
            total += node.weight.size * h * w
        elif isinstance(node, Dense):
            total += node.weight.size
    return total * int(graph.meta["timesteps"])


def timed(fn, min_time: float, min_reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call: warm-up calls, then at least `min_reps` calls and `min_time` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_model(name: str, tmp: Path, threads: int, min_time: float) -> dict:
    from tmkt.export.onnx import UnrolledModel, export_onnx
    from tmkt.runtime.classifier import make_session

    sj, graph = build(name, tmp)
    t_steps = MODELS[name]["timesteps"]
    t0 = time.perf_counter()
    path = export_onnx(graph, tmp / f"{name}.onnx", mode="unrolled", verify=True).path
    export_s = time.perf_counter() - t0
    sess, provider = make_session(path, "cpu", threads)
    deploy = UnrolledModel(graph, t_steps).eval()
    rng = np.random.default_rng(0)
    row: dict = {"model": name, "T": t_steps, "export_s": export_s, "provider": provider, "macs": macs_per_sample(graph)}
    for batch, key in ((1, "b1"), (32, "b32")):
        x = (rng.random((t_steps, batch, *graph.input_shape)) < 0.3).astype(np.float32)
        xt = torch.from_numpy(x)
        reps, warmup = (10, 2) if batch == 1 else (2, 1)
        engines = {
            "ort": lambda: sess.run(["logits"], {"events": x}),
            "deploy": lambda: deploy(xt),
            "sj": lambda: sj(xt),
        }
        with torch.inference_mode():
            for eng, fn in engines.items():
                times = timed(fn, min_time, reps, warmup)
                row[f"{eng}_{key}"] = statistics.median(times)
    return row


def bench_stream(name: str, tmp: Path, threads: int, window_ms: float = 50.0, windows: int = 6) -> dict:
    """Events/s through EventClassifier.stream on a DAVIS346 stream at its 12 Mev/s peak."""
    from tmkt.export.onnx import export_onnx
    from tmkt.runtime.classifier import EventClassifier, split_windows
    from tmkt.data.events import EVENT_DTYPE

    _, graph = build(name, tmp)
    path = export_onnx(graph, tmp / f"{name}.stream.onnx", mode="stream", verify=False).path
    clf = EventClassifier(path, provider="cpu", threads=threads)
    n = int(DAVIS_PEAK_EV_S * window_ms * 1e-3 * windows)
    rng = np.random.default_rng(1)
    ev = np.empty(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, DAVIS346[0], n)
    ev["y"] = rng.integers(0, DAVIS346[1], n)
    ev["t"] = np.sort(rng.integers(0, int(window_ms * 1000 * windows), n))
    ev["p"] = rng.integers(0, 2, n)
    chunks = split_windows(ev, int(window_ms * 1000))
    list(clf.stream(chunks[:1]))  # warm-up
    t0 = time.perf_counter()
    preds = list(clf.stream(chunks))
    wall = time.perf_counter() - t0
    recorded_s = window_ms * 1e-3 * len(preds)
    return {
        "model": name,
        "window_ms": window_ms,
        "events": n,
        "events_per_s": n / wall,
        "realtime_factor": recorded_s / wall,
        "ms_per_window": wall / len(preds) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime (default 1)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per engine and batch")
    ap.add_argument("--models", default="small,vgg")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    rows, streams = [], []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            rows.append(bench_model(name, Path(d), args.threads, args.min_time))
            streams.append(bench_stream(name, Path(d), args.threads))

    table = Table(title=f"batch-1 latency (ms) and batch-32 throughput (samples/s), {args.threads} thread(s), CPU")
    cols = ("model", "T", "GMAC/sample", "ORT b1", "deploy b1", "sj b1", "eager/ORT b1", "ORT b32", "deploy b32", "sj b32",
            "ORT/deploy b32", "ORT GMAC/s b32")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["T"]),
            f"{r['macs'] / 1e9:.3f}",
            f"{r['ort_b1'] * 1e3:.2f}",
            f"{r['deploy_b1'] * 1e3:.2f}",
            f"{r['sj_b1'] * 1e3:.2f}",
            f"{r['deploy_b1'] / r['ort_b1']:.2f}x / {r['sj_b1'] / r['ort_b1']:.2f}x",
            f"{32 / r['ort_b32']:.1f}",
            f"{32 / r['deploy_b32']:.1f}",
            f"{32 / r['sj_b32']:.1f}",
            f"{r['deploy_b32'] / r['ort_b32']:.2f}x",
            f"{32 * r['macs'] / r['ort_b32'] / 1e9:.1f}",
        )
    console = Console(width=180)
    console.print(table)
    st = Table(title=f"streaming (stream model, binning + T steps per window) vs DAVIS346 peak {DAVIS_PEAK_EV_S / 1e6:.0f} Mev/s")
    for col in ("model", "window ms", "events", "ms / window", "Mev/s sustained", "x DAVIS346 peak"):
        st.add_column(col, justify="right")
    for s in streams:
        st.add_row(
            s["model"],
            f"{s['window_ms']:.0f}",
            f"{s['events']:,}",
            f"{s['ms_per_window']:.1f}",
            f"{s['events_per_s'] / 1e6:.1f}",
            f"{s['realtime_factor']:.2f}",
        )
    console.print(st)


if __name__ == "__main__":
    main()
