"""onnxruntime vs PyTorch eager for exported tmkt models, and streaming events/s vs a DAVIS346.

Run: python bench/infer.py [--threads 1] [--quick]

For the built-in small model (32x32, T=8, 10 classes) and the VGG-SNN (48x48, T=10, 101
classes), both randomly initialised with random BN statistics (timing does not depend on
training), it measures on this CPU with `--threads` threads for every engine:

- dense multiply-accumulates per sample (conv + dense over T steps), to judge how close to the
  core's arithmetic peak each engine runs;
- latency at batch 1 (median over repeats) and throughput at batch 32 (samples/s) of
  onnxruntime fp32 (unrolled model, CPU provider), onnxruntime int8 (`tmkt export --int8`: the
  Loihi export's integers, `tmkt.export.onnx_int8`), the PyTorch deploy-graph module
  (`tmkt.export.onnx.UnrolledModel`, eager) and the spikingjelly network (eager);
- which onnxruntime kernels took the time at batch 1 (the session profiled: share of kernel
  time per op type, fp32 and int8);
- sustained streaming inference: the stream model (fp32 and int8) through
  `EventClassifier.stream` (binning + T steps per 50 ms window, membranes carried), fed a
  DAVIS346 (346x260) recording at its 12 Mev/s peak rate; events/s processed, and the
  real-time factor (recording time / processing time; > 1 keeps up).

Inputs are binary event frames with 30% density (the int8 models' readout range is calibrated
on 16 such samples, as `tmkt export` calibrates on training samples); the spike rate per layer
of the int8 model is printed. Ratios are from one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
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


def calibration(graph, samples: int = 16, seed: int = 5) -> np.ndarray:
    """Random binary input spikes `[T, N, C, H, W]` (30% density) for the int8 readout's range."""
    rng = np.random.default_rng(seed)
    return (rng.random((int(graph.meta["timesteps"]), samples, *graph.input_shape)) < 0.3).astype(np.uint8)


def op_profile(path: Path, feed: dict, threads: int, runs: int = 3) -> dict[str, float]:
    """Share of onnxruntime's kernel time per op type over `runs` calls (profiling on)."""
    import collections
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    per_op: collections.Counter = collections.Counter()
    for ev in json.loads(trace.read_text()):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] += ev["dur"]
    trace.unlink()
    total = sum(per_op.values()) or 1
    return {op: us / total for op, us in per_op.most_common()}


def bench_model(name: str, tmp: Path, threads: int, min_time: float) -> dict:
    from tmkt.export.netx_sim import simulate
    from tmkt.export.onnx import UnrolledModel, export_onnx
    from tmkt.export.onnx_int8 import export_onnx_int8, int8_network
    from tmkt.runtime.classifier import make_session

    sj, graph = build(name, tmp)
    t_steps = MODELS[name]["timesteps"]
    t0 = time.perf_counter()
    path = export_onnx(graph, tmp / f"{name}.onnx", mode="unrolled", verify=True).path
    export_s = time.perf_counter() - t0
    cal = calibration(graph)
    t0 = time.perf_counter()
    report8 = export_onnx_int8(graph, tmp / f"{name}.int8.onnx", mode="unrolled", calibration=cal, check_samples=2)
    export8_s = time.perf_counter() - t0
    sess, provider = make_session(path, "cpu", threads)
    sess8, _ = make_session(report8.path, "cpu", threads)
    deploy = UnrolledModel(graph, t_steps).eval()
    rng = np.random.default_rng(0)
    net, _ = int8_network(graph, cal)
    rates = [float(s.mean()) for s in simulate(net, cal[:, :4]).spikes[1:-1]]
    row: dict = {"model": name, "T": t_steps, "export_s": export_s, "export8_s": export8_s, "provider": provider,
                 "macs": macs_per_sample(graph), "int8_check": list(report8.checks.values())[-1],
                 "rates": rates}
    for batch, key in ((1, "b1"), (32, "b32")):
        x = (rng.random((t_steps, batch, *graph.input_shape)) < 0.3).astype(np.float32)
        xt = torch.from_numpy(x)
        reps, warmup = (10, 2) if batch == 1 else (2, 1)
        engines = {
            "ort": lambda: sess.run(["logits"], {"events": x}),
            "int8": lambda: sess8.run(["logits"], {"events": x}),
            "deploy": lambda: deploy(xt),
            "sj": lambda: sj(xt),
        }
        with torch.inference_mode():
            for eng, fn in engines.items():
                times = timed(fn, min_time, reps, warmup)
                row[f"{eng}_{key}"] = statistics.median(times)
        if batch == 1:
            row["ops_fp32"] = op_profile(path, {"events": x}, threads)
            row["ops_int8"] = op_profile(report8.path, {"events": x}, threads)
    return row


def bench_stream(name: str, tmp: Path, threads: int, int8: bool = False, window_ms: float = 50.0, windows: int = 6) -> dict:
    """Events/s through EventClassifier.stream on a DAVIS346 stream at its 12 Mev/s peak."""
    from tmkt.export.onnx import export_onnx
    from tmkt.export.onnx_int8 import export_onnx_int8
    from tmkt.runtime.classifier import EventClassifier, split_windows
    from tmkt.data.events import EVENT_DTYPE

    _, graph = build(name, tmp)
    if int8:
        path = export_onnx_int8(graph, tmp / f"{name}.stream.int8.onnx", mode="stream", verify=False,
                                calibration=calibration(graph)).path
    else:
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
        "model": name + (" int8" if int8 else " fp32"),
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
    # the bench's random runs say they bin event counts; their inputs here are binary frames, as the chip's
    from tmkt.export.netx import InputMismatchWarning

    warnings.simplefilter("ignore", InputMismatchWarning)

    from rich.console import Console
    from rich.table import Table

    rows, streams = [], []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            rows.append(bench_model(name, Path(d), args.threads, args.min_time))
            streams.append(bench_stream(name, Path(d), args.threads))
            streams.append(bench_stream(name, Path(d), args.threads, int8=True))

    table = Table(title=f"batch-1 latency (ms) and batch-32 throughput (samples/s), {args.threads} thread(s), CPU")
    cols = ("model", "T", "GMAC/sample", "ORT fp32 b1", "ORT int8 b1", "deploy b1", "sj b1", "fp32/int8 b1",
            "deploy/int8 b1", "sj/int8 b1", "eager/fp32 b1", "ORT fp32 b32", "ORT int8 b32", "deploy b32", "sj b32",
            "fp32/int8 b32", "int8 GMAC/s b32")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["T"]),
            f"{r['macs'] / 1e9:.3f}",
            f"{r['ort_b1'] * 1e3:.2f}",
            f"{r['int8_b1'] * 1e3:.2f}",
            f"{r['deploy_b1'] * 1e3:.2f}",
            f"{r['sj_b1'] * 1e3:.2f}",
            f"{r['ort_b1'] / r['int8_b1']:.2f}x",
            f"{r['deploy_b1'] / r['int8_b1']:.2f}x",
            f"{r['sj_b1'] / r['int8_b1']:.2f}x",
            f"{r['deploy_b1'] / r['ort_b1']:.2f}x",
            f"{32 / r['ort_b32']:.1f}",
            f"{32 / r['int8_b32']:.1f}",
            f"{32 / r['deploy_b32']:.1f}",
            f"{32 / r['sj_b32']:.1f}",
            f"{r['ort_b32'] / r['int8_b32']:.2f}x",
            f"{32 * r['macs'] / r['int8_b32'] / 1e9:.1f}",
        )
    console = Console(width=220)
    console.print(table)
    for r in rows:
        console.print(f"{r['model']}: export fp32 {r['export_s']:.1f} s, int8 {r['export8_s']:.1f} s; int8 check: {r['int8_check']}")
        console.print(f"  int8 spike rate per LIF layer: {', '.join(f'{v:.3f}' for v in r['rates'])}")
        for key in ("ops_fp32", "ops_int8"):
            top = ", ".join(f"{op} {share:.0%}" for op, share in list(r[key].items())[:8])
            console.print(f"  onnxruntime kernel time b1 {key[4:]}: {top}")
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
