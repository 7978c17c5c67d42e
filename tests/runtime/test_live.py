"""Live streams: a DV NetworkWriter on 127.0.0.1 replays a recording in real time and tmkt's window
predictions equal `tmkt infer` on the recording; growing files decode as `read_events` reads them;
bad servers give an error, never a hang."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tmkt.checkpoint import load_run, save_run
from tmkt.cli import app
from tmkt.data.binning import WindowCountError
from tmkt.data.events import EVENT_DTYPE, read_events, write_events
from tmkt.export.graph import lower_run
from tmkt.export.onnx import export_onnx
from tmkt.models import ModelConfig, build_model, randomize_batchnorm
from tmkt.runtime import EventClassifier
from tmkt.runtime.classifier import split_windows
from tmkt.runtime.follow import FollowError, decoder_for
from tmkt.runtime.live import (
    Batch,
    LiveError,
    Source,
    Windower,
    dv_network_source,
    follow_file_source,
    parse_live_url,
    run_live,
)

CLASSES = ["cat", "dog", "emu"]
SENSOR = (34, 34, 2)
SIZE = (16, 16)
T = 4


@pytest.fixture(scope="module")
def stream_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="small", num_classes=len(CLASSES), input_size=SIZE, width=0.5))
    randomize_batchnorm(model, 3, bias_mean=0.2)
    data = {"name": "toy", "class_names": CLASSES, "sensor_size": list(SENSOR), "input_size": list(SIZE),
            "timesteps": T, "binning": {"by": "time", "binary": False, "shift_to_origin": False}}
    run = save_run(root / "run", model, {"data": data, "method": {"name": "event-only"}, "train": {}, "metrics": {}})
    return export_onnx(lower_run(load_run(run)), root / "s.onnx", mode="stream", verify=False).path


def recording(seed=0, n=3000, duration_us=400_000, t0=1_700_000_000_000_000):
    """Events with bursts and a silent stretch (so that some windows are empty)."""
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, SENSOR[0], n)
    ev["y"] = rng.integers(0, SENSOR[1], n)
    t = np.sort(rng.integers(0, duration_us, n))
    t = np.where((t > 150_000) & (t < 210_000), t + 60_000, t)  # a 60 ms gap: empty windows
    ev["t"] = np.sort(t) + t0
    ev["p"] = rng.integers(0, 2, n)
    return ev


def reference(model, events, window_us):
    clf = EventClassifier(model, provider="cpu")
    return list(clf.stream(split_windows(events, window_us), carry_state=True))


# ---------------------------------------------------------------- windows, in-process source


def batches_of(events, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(Batch(events[i : i + s], time.perf_counter()))
        i += s
    return out


@pytest.mark.parametrize("sizes", [[3000], [1] * 50 + [2950], [7, 500, 1, 1, 1491, 1000]])
def test_windower_cuts_split_windows(sizes):
    ev = recording()
    w = Windower(20_000)
    got = []
    for b in batches_of(ev, sizes):
        got += w.push(b)
    got += w.flush()
    ref = split_windows(ev, 20_000)
    assert [g.index for g in got] == list(range(len(ref)))
    for g, r in zip(got, ref):
        e = np.concatenate(g.events) if g.events else np.empty(0, EVENT_DTYPE)
        assert np.array_equal(e, r)
    assert any(len(r) == 0 for r in ref)  # the gap made empty windows


def _list_source(batches, name="list"):
    return Source(name, lambda stop: iter(batches))


def test_run_live_equals_stream_and_reports_drops(stream_model):
    ev = recording(1)
    ref = reference(stream_model, ev, 20_000)
    clf = EventClassifier(stream_model, provider="cpu")
    got = []
    s = run_live(clf, _list_source(batches_of(ev, [100] * 30)), 20_000, on_window=got.append, max_backlog=None)
    assert s.end == "ended" and s.windows == len(ref) and s.events == len(ev) and s.dropped_windows == 0
    assert [g.label for g in got] == [r.label for r in ref]
    np.testing.assert_allclose([g.score for g in got], [r.score for r in ref], rtol=1e-6)
    assert s.percentile(50) is not None and s.percentile(99) >= s.percentile(50)
    # everything at once with a backlog of 2: all but the last two windows are dropped, and said so
    drops = []
    s = run_live(clf, _list_source([Batch(ev, time.perf_counter())]), 20_000, max_backlog=2,
                 on_drop=lambda idx, n: drops.append((idx, n)))
    assert s.windows == 2 and s.dropped_windows == len(ref) - 2 and drops[0][0] == list(range(len(ref) - 2))
    assert s.dropped_events + s.events == len(ev) and s.to_dict()["dropped_windows"] == len(ref) - 2


def test_live_needs_stream_model(tmp_path, stream_model):
    clf = EventClassifier(stream_model, provider="cpu")
    clf.mode = "unrolled"
    with pytest.raises(LiveError, match="stream-mode"):
        run_live(clf, _list_source([]), 1000)


def test_a_window_given_as_packets_classifies_as_its_concatenation(stream_model):
    """run_live hands a window's packets to the binning as they came (no concatenated copy)."""
    ev = recording(4)
    clf = EventClassifier(stream_model, provider="cpu")
    packets = [ev[a:b] for a, b in [(0, 1), (1, 700), (700, 700), (700, 2999), (2999, 3000)]]
    np.testing.assert_array_equal(clf.frames(packets), clf.frames(ev))
    (p_list, s_list), (p_one, s_one) = (clf.classify_window(e, clf.zero_state(1)) for e in (packets, ev))
    np.testing.assert_array_equal(p_list.logits, p_one.logits)
    assert p_list.events == p_one.events == len(ev) and p_list.t_range_us == p_one.t_range_us
    for k in s_one:
        np.testing.assert_array_equal(s_list[k], s_one[k])


def test_windower_at_the_int64_limit_cuts_split_windows():
    ev = recording(5, n=500)
    ev["t"] += 2**63 - 1 - int(ev["t"][-1])  # the last event at the largest int64 timestamp
    w = Windower(20_000)
    got = [win for b in batches_of(ev, [100] * 5) for win in w.push(b)] + w.flush()
    ref = split_windows(ev, 20_000)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert np.array_equal(np.concatenate(g.events) if g.events else ev[:0], r)


def test_a_time_jump_over_the_window_limit_ends_the_run(stream_model):
    """A stream whose clock jumps by 10**12 µs would complete 5e7 empty windows at once: refused
    with a named error (after the windows before the jump were classified), never built."""
    ev = recording(6, n=400)
    late = ev[-50:].copy()
    late["t"] += 10**12
    with pytest.raises(WindowCountError, match="jumps by 50,000,0.. windows"):
        w = Windower(20_000, max_windows=1000)
        w.push(Batch(ev, time.perf_counter()))
        w.push(Batch(late, time.perf_counter()))
    clf = EventClassifier(stream_model, provider="cpu")
    source = _list_source(batches_of(ev, [200, 200]) + [Batch(late, time.perf_counter())], name="jumpy")
    with pytest.raises(LiveError, match="jumpy: the stream's time jumps by .* more than the limit of 1,000") as err:
        run_live(clf, source, 20_000, max_backlog=None, max_windows=1000)
    summary = err.value.summary
    assert summary.end == "error" and summary.windows == len(split_windows(ev, 20_000))


def test_infer_refuses_too_many_windows_and_goes_on(stream_model, tmp_path):
    """A valid 2-event file spanning 2**32 - 1 µs cut into 1 µs windows (4.3e9 windows; this tried
    to allocate 32 GiB): one line naming the file, exit 1, and the other file still classified."""
    long = np.zeros(2, EVENT_DTYPE)
    long["t"] = [0, 2**32 - 1]
    write_events(tmp_path / "long.npy", long, SENSOR)
    write_events(tmp_path / "ok.npy", recording(7, n=200, duration_us=3_000), SENSOR)
    runner = CliRunner()
    res = runner.invoke(app, ["infer", str(stream_model), str(tmp_path / "long.npy"), str(tmp_path / "ok.npy"),
                              "--window-ms", "0.001", "--json"])
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert [e["file"] for e in doc["errors"]] == [str(tmp_path / "long.npy")]
    assert doc["errors"][0]["error"].startswith(f"{tmp_path / 'long.npy'}: 4,294,967,296 windows of 1 µs")
    assert "--max-windows" in doc["errors"][0]["error"]
    assert {p["file"] for p in doc["predictions"]} == {str(tmp_path / "ok.npy")}
    # the limit is a flag: 2 windows of 2,200 s pass under a limit of 2, and a limit of 1 refuses them
    assert runner.invoke(app, ["infer", str(stream_model), str(tmp_path / "long.npy"), "--window-ms", "2200000",
                               "--max-windows", "2"]).exit_code == 0
    res = runner.invoke(app, ["infer", str(stream_model), str(tmp_path / "long.npy"), "--window-ms", "4294967",
                              "--max-windows", "1"])
    assert res.exit_code == 1 and "long.npy: 2 windows of 4,294,967,000 µs" in res.output


# ---------------------------------------------------------------- DV network stream

WRITER = r"""
import sys, time, os
import numpy as np
import dv_processing as dv
port, path, packet_us = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ev = np.load(path)
store = dv.EventStore()
for e in ev:
    store.push_back(int(e["t"]), int(e["x"]), int(e["y"]), bool(e["p"]))
w = dv.io.NetworkWriter("127.0.0.1", port, dv.io.Stream.EventStream(0, "events", "DVS346", (34, 34)))
print("ready", flush=True)
since = None
while True:  # a client that stays (tmkt probes the header first with a short connection)
    since = (since or time.monotonic()) if w.getClientCount() else None
    if since and time.monotonic() - since > 0.3:
        break
    time.sleep(0.01)
t0_ev, t0 = int(ev["t"][0]), time.monotonic()
edges = np.arange(t0_ev, int(ev["t"][-1]) + packet_us + 1, packet_us)
for a, b in zip(edges[:-1], edges[1:]):  # real time: each packet when its last microsecond is past
    delay = (b - t0_ev) / 1e6 - (time.monotonic() - t0)
    if delay > 0:
        time.sleep(delay)
    part = store.sliceTime(int(a), int(b))
    if part.size():
        w.writeEvents(part)
while w.getQueuedPacketCount():
    time.sleep(0.01)
time.sleep(0.2)
os._exit(0)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dv_writer(tmp_path):
    pytest.importorskip("dv_processing")
    procs = []

    def start(events, packet_us=2000):
        port = free_port()
        np.save(tmp_path / "rec.npy", events)
        script = tmp_path / "writer.py"
        script.write_text(WRITER)
        p = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path / "rec.npy"), str(packet_us)],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready"
        return port

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def test_dv_network_stream_equals_infer(stream_model, dv_writer, tmp_path):
    ev = recording(2)
    write_events(tmp_path / "rec.npz", ev, SENSOR)
    port = dv_writer(ev)
    runner = CliRunner()
    # A backlog as long as the recording: on a loaded machine the reader may fall behind the
    # real-time replay, but no window is dropped, so the comparison below does not depend on speed.
    res = runner.invoke(app, ["infer", str(stream_model), "--live", f"tcp://127.0.0.1:{port}", "--window-ms", "20",
                              "--json", "--provider", "cpu", "--max-backlog", "100000"])
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    windows = [d for d in lines if "window" in d]
    summary = [d["summary"] for d in lines if "summary" in d][0]
    # the writer finished its replay and left: reported as an error, after every window was classified
    assert res.exit_code == 1 and "closed by the writer" in res.stderr
    assert summary["end"] == "closed" and summary["dropped_windows"] == 0
    off = runner.invoke(app, ["infer", str(stream_model), str(tmp_path / "rec.npz"), "--window-ms", "20", "--json",
                              "--provider", "cpu"])
    assert off.exit_code == 0, off.output
    ref = json.loads(off.stdout)["predictions"]
    assert [w["window"] for w in windows] == [r["window"] for r in ref]
    assert [w["label"] for w in windows] == [r["label"] for r in ref]
    assert [w["events"] for w in windows] == [r["events"] for r in ref]
    np.testing.assert_allclose([w["score"] for w in windows], [r["score"] for r in ref], rtol=1e-6)
    assert summary["windows"] == len(ref) and summary["events"] == len(ev)
    assert summary["latency_p99_ms"] >= summary["latency_p50_ms"] > 0


def _server(behaviour):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        conn, _ = srv.accept()
        if behaviour == "garbage":
            conn.sendall(os.urandom(4096))
        elif behaviour == "close":
            conn.close()
            return
        time.sleep(5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


@pytest.mark.parametrize("behaviour,message", [
    ("garbage", "not a DV network stream"),
    ("silent", "no DV stream header within 1 s"),
    ("close", "closed the connection before sending a DV stream header"),
])
def test_bad_servers_give_errors_not_hangs(stream_model, behaviour, message):
    pytest.importorskip("dv_processing")
    srv, port = _server(behaviour)
    clf = EventClassifier(stream_model, provider="cpu")
    t0 = time.monotonic()
    with pytest.raises(LiveError, match=message):
        run_live(clf, dv_network_source("127.0.0.1", port, connect_timeout=1.0), 20_000)
    assert time.monotonic() - t0 < 20
    srv.close()


def test_refused_and_bad_urls(stream_model):
    pytest.importorskip("dv_processing")
    port = free_port()  # nobody listens there now
    res = CliRunner().invoke(app, ["infer", str(stream_model), "--live", f"127.0.0.1:{port}", "--provider", "cpu"])
    assert res.exit_code == 1 and "cannot connect" in res.stderr and "Traceback" not in res.output
    assert parse_live_url("tcp://10.0.0.2:7777") == ("10.0.0.2", 7777)
    with pytest.raises(LiveError, match="tcp://HOST:PORT"):
        parse_live_url("http://x")


# ---------------------------------------------------------------- growing files


def _evt3_words(ev, rng, vectors=True):
    """EVT 3.0 words for time-sorted events: singles, and vector groups where a row has a run."""
    words, th, tl, y = [], None, None, None
    i = 0
    while i < len(ev):
        e = ev[i]
        t = int(e["t"])
        hi, lo = (t >> 12) & 0xFFF, t & 0xFFF
        if hi != th:
            words.append(0x8000 | hi)
            th = hi
        if lo != tl:
            words.append(0x6000 | lo)
            tl = lo
        if int(e["y"]) != y:
            y = int(e["y"])
            words.append(y)
        if vectors and rng.random() < 0.2:  # a vector: base x, then 12 + 8 bits of events at x .. x+19
            words.append(0x3000 | (int(e["p"]) << 11) | int(e["x"]))
            words.append(0x4000 | int(rng.integers(0, 1 << 12)))
            words.append(0x5000 | int(rng.integers(0, 1 << 8)))
        else:
            words.append(0x2000 | (int(e["p"]) << 11) | int(e["x"]))
        i += 1
    return np.asarray(words, "<u2")


def _evt2_words(ev):
    words, high = [], None
    for e in ev:
        t = int(e["t"])
        if t >> 6 != high:
            high = t >> 6
            words.append((0x8 << 28) | high)
        words.append((int(e["p"]) << 28) | ((t & 63) << 22) | (int(e["x"]) << 11) | int(e["y"]))
    return np.asarray(words, "<u4")


def _raw_events(n, rng, span_us):
    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"], ev["y"] = rng.integers(0, 300, n), rng.integers(0, 240, n)
    ev["t"] = np.sort(rng.integers(0, span_us, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


def _pieces(data, rng):
    cuts = np.sort(rng.integers(0, len(data), 40))
    return [data[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(data)])]


@pytest.mark.parametrize("evt", ["3", "2"])
def test_follow_decoders_match_read_events(tmp_path, evt):
    rng = np.random.default_rng(int(evt))
    # 40 s: the 24-bit EVT3 time base wraps twice (every 16.8 s)
    ev = _raw_events(3000, rng, 40_000_000)
    words = _evt3_words(ev, rng) if evt == "3" else _evt2_words(ev)
    header = f"% camera test\n% evt {evt}.0\n% format EVT{evt};height=240;width=346\n% end\n".encode()
    path = tmp_path / f"rec{evt}.raw"
    data = header + words.tobytes()
    path.write_bytes(data)
    ref = read_events(path).events
    dec = decoder_for(path)
    got = np.concatenate([dec.feed(p) for p in _pieces(data, rng)] + [dec.finish()])
    assert len(ref) >= len(ev) and np.array_equal(got, ref)
    if evt == "2":
        assert np.array_equal(got, ev)
    part = decoder_for(path)
    part.feed(data[:-1])
    with pytest.raises(FollowError, match="ends inside"):
        part.finish()


def test_follow_text_and_unknown(tmp_path):
    ev = recording(3, n=200)
    text = "# t,x,y,p\n" + "".join(f"{e['t']},{e['x']},{e['y']},{e['p']}\n" for e in ev)
    dec = decoder_for(tmp_path / "a.csv")
    data = text.encode()
    got = np.concatenate([dec.feed(data[i : i + 37]) for i in range(0, len(data), 37)] + [dec.finish()])
    assert np.array_equal(got, ev)
    with pytest.raises(FollowError, match="line 2"):
        decoder_for(tmp_path / "b.txt").feed(b"1 2 3 4\n1 2 x 4\n")
    # timestamps of 1e30 or infinite, and pixels beyond uint16: a named error, not an OverflowError
    for bad, why in ((b"1e30,1,2,1", "value out of range"), (b"inf,1,2,1", "expected t,x,y,p"),
                     (b"9223372036854775808,1,2,1", "value out of range"), (b"5,70000,2,1", "value out of range")):
        with pytest.raises(FollowError, match=f"line 2: {why}"):
            decoder_for(tmp_path / "d.csv").feed(b"0,0,0,0\n" + bad + b"\n")
    assert decoder_for(tmp_path / "e.csv").feed(b"9223372036854775807,65535,65535,1\n")["t"][0] == 2**63 - 1
    with pytest.raises(FollowError, match="--follow reads"):
        decoder_for(tmp_path / "c.aedat4")


def test_follow_growing_file_equals_infer(stream_model, tmp_path):
    """A writer thread appends an EVT3 .raw file in pieces while tmkt follows it."""
    ev = recording(4)
    ev["t"] -= ev["t"][0]
    rng = np.random.default_rng(4)
    header = b"% evt 3.0\n% format EVT3;height=34;width=34\n% end\n"
    data = header + _evt3_words(ev, np.random.default_rng(99), vectors=False).tobytes()
    path = tmp_path / "grow.raw"
    path.write_bytes(b"")
    recorded = tmp_path / "whole.raw"
    recorded.write_bytes(data)
    whole = read_events(recorded).events

    def writer():
        with open(path, "ab") as fh:
            for piece in _pieces(data, rng):
                fh.write(piece)
                fh.flush()
                time.sleep(0.005)

    th = threading.Thread(target=writer)
    th.start()
    # No window may be dropped and the writer may stall on a loaded machine: a long backlog and idle timeout.
    res = CliRunner().invoke(app, ["infer", str(stream_model), "--follow", str(path), "--window-ms", "25",
                                   "--idle-timeout", "5", "--max-backlog", "100000", "--json", "--provider", "cpu"])
    th.join()
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    windows = [d for d in lines if "window" in d]
    ref = reference(stream_model, whole, 25_000)
    assert [w["label"] for w in windows] == [r.label for r in ref]
    np.testing.assert_allclose([w["score"] for w in windows], [r.score for r in ref], rtol=1e-6)
    assert lines[-1]["summary"]["end"] == "ended" and lines[-1]["summary"]["events"] == len(whole)


def test_follow_missing_file(stream_model, tmp_path):
    clf = EventClassifier(stream_model, provider="cpu")
    with pytest.raises(LiveError, match="no such file"):
        run_live(clf, follow_file_source(tmp_path / "nope.raw", idle_timeout=0.1), 1000)


def test_ctrl_c_ends_with_a_summary(stream_model, tmp_path):
    """SIGINT to a real `tmkt infer --follow` process: a clean exit (0) after its summary line."""
    import signal

    ev = recording(5)
    path = tmp_path / "live.csv"
    path.write_text("".join(f"{e['t']},{e['x']},{e['y']},{e['p']}\n" for e in ev))
    cmd = [sys.executable, "-m", "tmkt", "infer", str(stream_model), "--follow", str(path), "--window-ms", "20",
           "--max-backlog", "1000",
           "--json", "--provider", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rest: dict[str, str] = {}
    try:
        first = proc.stdout.readline()  # the first window: the run is live (the file never ends)
        assert "window" in json.loads(first)
        # Drain both pipes from threads: readline() may already hold later lines in its buffer
        # (communicate() would lose them), and a full pipe must never block the process.
        readers = [threading.Thread(target=lambda k=k: rest.__setitem__(k, getattr(proc, k).read()), daemon=True)
                   for k in ("stdout", "stderr")]
        for r in readers:
            r.start()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        for r in readers:
            r.join(timeout=30)
    finally:
        proc.kill()
    out, err = rest["stdout"], rest["stderr"]
    lines = [json.loads(line) for line in [first, *out.splitlines()] if line.strip()]
    summary = lines[-1]["summary"]
    assert proc.returncode == 0, err
    assert summary["end"] == "interrupted" and "Traceback" not in err
    # everything up to the last event's window was classified before the interrupt, none dropped
    assert summary["windows"] == len([d for d in lines if "window" in d]) and summary["dropped_windows"] == 0
