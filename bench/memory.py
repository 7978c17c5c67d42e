"""Peak memory of `tmkt data info` and `tmkt infer --window-ms 50` against recording length.

Run: python bench/memory.py [--events 5e6 20e6] [--formats npz raw npy] [--window-ms 50]

For each format and each event count it writes one recording (random events on a 128x128
sensor at 200,000 ev/s, so 20M events span 100 s), exports a small randomly initialised stream
model (T=4, 16x16 input, 3 classes), and runs each command in a fresh process under
`/usr/bin/time -v`, reading its "Maximum resident set size". The figure that matters is the
ratio of the peak at the largest count to the peak at the smallest: readers that hold the whole
recording grow about 52 bytes per event (issue 15: infer 532 MB at 5M vs 1,308 MB at 20M); the
chunked readers should stay within 1.2x. Wall times are printed too (they depend on the load
of the machine; they are not the point here).

This is a benchmark, not a test: it takes minutes and writes about 1 GB of temporary files.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SENSOR = (128, 128, 2)
RATE_EV_S = 200_000
CLASSES = ["a", "b", "c"]


def export_model(tmp: Path) -> Path:
    """A randomly initialised small stream model (the bench measures memory, not accuracy)."""
    import torch

    from tmkt.checkpoint import load_run, save_run
    from tmkt.export.graph import lower_run
    from tmkt.export.onnx import export_onnx
    from tmkt.models import ModelConfig, build_model, randomize_batchnorm

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="small", num_classes=len(CLASSES), input_size=(16, 16), width=0.5))
    randomize_batchnorm(model, 0)
    data = {
        "name": "bench-memory",
        "class_names": CLASSES,
        "sensor_size": list(SENSOR),
        "input_size": [16, 16],
        "timesteps": 4,
        "binning": {"by": "time", "binary": False, "shift_to_origin": False},
    }
    run = load_run(save_run(tmp / "run", model, {"data": data, "method": {"name": "bench"}, "train": {}, "metrics": {}}))
    return export_onnx(lower_run(run), tmp / "model.onnx", mode="stream", verify=False).path


def random_events(n: int, seed: int = 0) -> np.ndarray:
    from tmkt.data.events import EVENT_DTYPE

    rng = np.random.default_rng(seed)
    ev = np.empty(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, SENSOR[0], n)
    ev["y"] = rng.integers(0, SENSOR[1], n)
    ev["t"] = np.sort(rng.integers(0, int(n / RATE_EV_S * 1e6), n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


def write_evt2(path: Path, ev: np.ndarray) -> None:
    """Prophesee EVT 2.0: a TIME_HIGH word (t >> 6) wherever it changes, then the CD word."""
    t = ev["t"].astype(np.int64)
    high = t >> 6
    new_high = np.concatenate([[True], high[1:] != high[:-1]])
    cd = (ev["p"].astype(np.uint32) << 28) | ((t & 63).astype(np.uint32) << 22) | (ev["x"].astype(np.uint32) << 11) | ev["y"]
    words = np.empty(len(ev) + int(new_high.sum()), np.uint32)
    slot = np.arange(len(ev)) + np.cumsum(new_high)  # each event's word follows its TIME_HIGH
    words[slot] = cd
    words[slot[new_high] - 1] = (0x8 << 28) | high[new_high].astype(np.uint32)
    with open(path, "wb") as fh:
        fh.write(b"% evt 2.0\n% format EVT2;height=128;width=128\n% end\n")
        words.astype("<u4").tofile(fh)


def write_recording(path: Path, ev: np.ndarray) -> None:
    from tmkt.data.events import write_events

    if path.suffix == ".raw":
        write_evt2(path, ev)
    else:
        write_events(path, ev, SENSOR)


def peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit code) of `cmd` in a fresh process."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    if res.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return int(match.group(1)) / 1024, wall, res.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=float, nargs="+", default=[5e6, 20e6])
    ap.add_argument("--formats", nargs="+", default=["npz", "raw"], help="npz, npy, h5, raw (EVT2), bin")
    ap.add_argument("--window-ms", type=float, default=50.0)
    ap.add_argument("--commands", nargs="+", default=["info", "infer"])
    args = ap.parse_args()
    tmkt = [sys.executable, "-m", "tmkt"]
    with tempfile.TemporaryDirectory(prefix="tmkt-bench-memory-") as tmpdir:
        tmp = Path(tmpdir)
        model = export_model(tmp)
        rows = []
        for fmt in args.formats:
            for n in (int(v) for v in args.events):
                path = tmp / f"rec{n}.{fmt}"
                write_recording(path, random_events(n))
                size_mb = path.stat().st_size / 1e6
                for command in args.commands:
                    cmd = [*tmkt, "data", "info", str(path)] if command == "info" else [
                        *tmkt, "infer", str(model), str(path), "--window-ms", str(args.window_ms), "--json"]
                    rss, wall, _ = peak_rss(cmd)
                    rows.append((fmt, command, n, size_mb, rss, wall))
                    print(f"{fmt:4s} {command:5s} {n / 1e6:5.1f}M events ({size_mb:7.1f} MB file): "
                          f"peak RSS {rss:7.1f} MB, {wall:6.1f} s", flush=True)
                path.unlink()
        print("\nratio of peak RSS, largest / smallest event count (flat: <= 1.20)")
        for fmt in args.formats:
            for command in args.commands:
                sel = [r for r in rows if r[0] == fmt and r[1] == command]
                lo, hi = min(sel, key=lambda r: r[2]), max(sel, key=lambda r: r[2])
                ratio = hi[4] / lo[4]
                print(f"{fmt:4s} {command:5s} {lo[2] / 1e6:.0f}M {lo[4]:.0f} MB -> {hi[2] / 1e6:.0f}M {hi[4]:.0f} MB: "
                      f"{ratio:.3f} {'flat' if ratio <= 1.2 else 'GROWS'}")


if __name__ == "__main__":
    main()
