"""Byte-level fuzz of every event reader and of the ONNX model loader (issue 15).

A valid small file of each format is written here in its real layout, then mutated by
hypothesis (derandomized: the same mutants on every run): bytes flipped, set, inserted, deleted,
the file truncated. Every mutant must give a well-formed result or a `TmktError` naming the file,
never another exception, never a crash. A well-formed result is time-sorted `EVENT_DTYPE` events
inside the sensor size it reports, equal to what the chunked reader gives (7 events a chunk) and
summarized alike by `scan_events`; for a model, `tmkt infer` exits 0 with probabilities summing to
1, or 1 with one `error:` line.

Each format runs in a worker process (`fuzz` below), so a decoder that aborts the process (as
the Rust AEDAT4 decoder did on a non-UTF-8 description) fails one test instead of killing pytest,
and its stderr is checked for Rust panic text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
EXAMPLES = {"onnx": 100}
DEFAULT_EXAMPLES = 200
FORMATS = ["bin", "aedat4", "npy", "npz", "h5", "raw2", "raw3", "dat", "onnx"]


def small_events(n: int = 40, w: int = 34, h: int = 34) -> np.ndarray:
    from tmkt.data.events import EVENT_DTYPE

    rng = np.random.default_rng(7)
    ev = np.empty(n, EVENT_DTYPE)
    ev["x"], ev["y"] = rng.integers(0, w, n), rng.integers(0, h, n)
    ev["t"], ev["p"] = np.sort(rng.integers(0, 2**20, n)), rng.integers(0, 2, n)
    return ev


def valid_file(fmt: str, folder: Path) -> tuple[Path, np.ndarray]:
    """A small valid file of `fmt` and the events it holds."""
    import struct

    sys.path.insert(0, str(HERE))
    from test_events import aedat4_bytes, evt2_words, evt3_words

    from tmkt.data.events import write_events

    ev = small_events()
    rows = list(zip(ev["t"].tolist(), ev["x"].tolist(), ev["y"].tolist(), ev["p"].tolist()))
    if fmt in ("bin", "npy", "npz", "h5"):
        path = folder / f"rec.{fmt}"
        write_events(path, ev, (34, 34))
    elif fmt == "aedat4":
        path = folder / "rec.aedat4"
        path.write_bytes(aedat4_bytes([ev[:20], ev[20:]], 34, 34))
    elif fmt == "raw2":
        path = folder / "rec.raw"
        words = evt2_words(rows)
        path.write_bytes(b"% evt 2.0\n% format EVT2;height=34;width=34\n% end\n" + struct.pack(f"<{len(words)}I", *words))
    elif fmt == "raw3":
        path = folder / "rec.raw"
        words = evt3_words(rows)
        path.write_bytes(b"% evt 3.0\n% format EVT3;height=34;width=34\n% end\n" + struct.pack(f"<{len(words)}H", *words))
    elif fmt == "dat":
        path = folder / "rec.dat"
        body = b"".join(struct.pack("<II", t, x | (y << 14) | (p << 28)) for t, x, y, p in rows)
        path.write_bytes(b"% Width 34\n% Height 34\n% end\n" + bytes([0x0C, 8]) + body)
    else:
        raise ValueError(fmt)
    return path, ev


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, value in ops:
        pos = min(pos, len(out))
        if kind == "flip" and pos < len(out):
            out[pos] ^= 1 << (value % 8)
        elif kind == "set" and pos < len(out):
            out[pos] = value
        elif kind == "insert":
            out[pos:pos] = bytes([value]) * (1 + value % 4)
        elif kind == "delete":
            del out[pos : pos + 1 + value % 4]
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


def check_events(path: Path) -> str:
    """'read' (and the result is well-formed) or 'error' (a TmktError naming the file)."""
    from tmkt.data.events import EVENT_DTYPE, ReadLimits, open_events, read_events, scan_events, summarize
    from tmkt.errors import TmktError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rec = read_events(path)
        except TmktError as exc:
            assert str(path) in str(exc), exc
            return "error"
        ev = rec.events
        assert ev.dtype == EVENT_DTYPE and ev.ndim == 1
        assert len(ev) < 2 or (np.diff(ev["t"]) >= 0).all()
        w, h, two = rec.sensor_size
        assert two == 2 and (len(ev) == 0 or (ev["x"].max() < w and ev["y"].max() < h))
        stream = open_events(path, limits=ReadLimits(chunk_events=7))
        pieces = list(stream.chunks())
        again = np.concatenate(pieces) if pieces else np.empty(0, EVENT_DTYPE)
        again = again[np.argsort(again["t"], kind="stable")]
        assert again.tobytes() == ev.tobytes() and stream.sensor_size == rec.sensor_size
        assert scan_events(path) == summarize(rec)
    return "read"


def check_model(path: Path, events: Path) -> str:
    """'read' (tmkt infer exits 0 with a valid prediction) or 'error' (exit 1, one error line)."""
    from typer.testing import CliRunner

    from tmkt.cli import app

    res = CliRunner().invoke(app, ["infer", str(path), str(events), "--provider", "cpu", "--json"])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    if res.exit_code == 0:
        doc = json.loads(res.stdout)
        (pred,) = doc["predictions"]
        assert pred["label"] in doc["class_names"] and abs(sum(pred["probabilities"]) - 1) < 1e-6
        return "read"
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return "error"


def fuzz(fmt: str, examples: int) -> None:
    """Run in a worker process: mutate the valid file of `fmt` `examples` times; print the counts."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    folder = Path(tempfile.mkdtemp(prefix=f"tmkt-fuzz-{fmt}-"))
    if fmt == "onnx":
        import importlib.util

        from tmkt.data.events import write_events

        spec = importlib.util.spec_from_file_location("_mc", HERE.parent / "runtime" / "test_model_check.py")
        mc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mc)
        path = Path(mc.save(mc.tiny_model("stream"), folder / "model.onnx"))
        events = folder / "ev.npz"
        write_events(events, small_events(40, 8, 8), (8, 8))
        assert check_model(path, events) == "read"  # the unmutated model runs

        def check(p: Path) -> str:
            return check_model(p, events)
    else:
        from tmkt.data.events import read_events

        path, ev = valid_file(fmt, folder)
        assert read_events(path).events.tobytes() == ev.tobytes()  # the unmutated file reads exactly
        check = check_events
    data = path.read_bytes()
    counts: Counter = Counter()
    op = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.integers(0, len(data)), st.integers(0, 255))

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(op, min_size=1, max_size=3))
    def one(ops):
        path.write_bytes(mutate(data, ops))
        counts[check(path)] += 1

    one()
    print(json.dumps(dict(counts)))


WORKER = "import runpy, sys; sys.path.insert(0, sys.argv[1]); runpy.run_path(sys.argv[2])['fuzz'](sys.argv[3], int(sys.argv[4]))"


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutants_give_a_result_or_a_named_error(fmt):
    examples = EXAMPLES.get(fmt, DEFAULT_EXAMPLES)
    res = subprocess.run([sys.executable, "-c", WORKER, str(HERE), __file__, fmt, str(examples)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{fmt}: the worker ended with {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-8000:]}"
    assert "panicked" not in res.stderr and "RUST_BACKTRACE" not in res.stderr, res.stderr[-4000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    # every example was checked; mutants that still read must have been checked as results too
    assert sum(counts.values()) >= examples * 0.9, counts
    assert counts.get("error", 0) > 0, counts
