"""`tmkt infer` and EventClassifier give the PyTorch prediction on event files written here."""

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from tmkt.checkpoint import load_run, save_run
from tmkt.cli import app
from tmkt.data.events import EVENT_DTYPE, write_events
from tmkt.data.spec import DataSpec, frames_from_events
from tmkt.export.graph import init_state, lower_run, step_graph
from tmkt.export.metadata import MetadataError
from tmkt.export.onnx import export_onnx
from tmkt.models import ModelConfig, build_model, randomize_batchnorm
from tmkt.runtime import EventClassifier
from tmkt.runtime.classifier import InferenceError, softmax, split_windows

CLASSES = ["cat", "dog", "emu"]
SENSOR = (34, 34, 2)
SIZE = (16, 16)
T = 4


def make_run(path):
    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="small", num_classes=len(CLASSES), input_size=SIZE, width=0.5))
    randomize_batchnorm(model, 3, bias_mean=0.2)
    data = {
        "name": "toy",
        "class_names": CLASSES,
        "sensor_size": list(SENSOR),
        "input_size": list(SIZE),
        "timesteps": T,
        "binning": {"by": "time", "binary": False, "shift_to_origin": False},
    }
    return save_run(path, model, {"data": data, "method": {"name": "event-only"}, "train": {}, "metrics": {}})


def random_events(seed, n=4000, duration_us=200_000):
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, SENSOR[0], n)
    ev["y"] = rng.integers(0, SENSOR[1], n)
    ev["t"] = np.sort(rng.integers(0, duration_us, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    run = load_run(make_run(root / "run"))
    graph = lower_run(run)
    return {
        "run": run,
        "graph": graph,
        "unrolled": export_onnx(graph, root / "u.onnx", mode="unrolled", verify=False).path,
        "stream": export_onnx(graph, root / "s.onnx", mode="stream", verify=False).path,
        "spec": DataSpec.from_dict(run.data),
    }


def torch_probs(run, spec, events):
    """Softmax of the spikingjelly model's mean logits on the binned recording."""
    frames = torch.from_numpy(frames_from_events(events, spec))[:, None]
    with torch.no_grad():
        return softmax(run.model(frames)["logits"].mean(0)[0].double().numpy())


@pytest.mark.parametrize("mode", ["unrolled", "stream"])
def test_cli_infer_matches_pytorch(models, tmp_path, mode):
    files = []
    for k, suffix in enumerate([".npz", ".bin", ".h5"]):
        ev = random_events(k)
        write_events(tmp_path / f"rec{k}{suffix}", ev, SENSOR)
        files.append((tmp_path / f"rec{k}{suffix}", ev))
    res = CliRunner().invoke(app, ["infer", str(models[mode]), *[str(f) for f, _ in files], "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider") and doc["mode"] == mode
    preds = doc["predictions"]
    assert [p["file"] for p in preds] == [str(f) for f, _ in files]
    for p, (_, ev) in zip(preds, files):
        want = torch_probs(models["run"], models["spec"], ev)
        assert p["index"] == int(np.argmax(want)) and p["label"] == CLASSES[p["index"]]
        np.testing.assert_allclose(p["probabilities"], want, atol=1e-5)
        assert p["score"] == pytest.approx(want.max(), abs=1e-5) and p["latency_ms"] > 0
        assert p["events"] == len(ev)
    # a folder expands to its event files, and the table output names the provider
    res = CliRunner().invoke(app, ["infer", str(models[mode]), str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "ExecutionProvider" in res.output and all(f.name in res.output for f, _ in files)


def _windows_reference(models, ev, window_us, carry):
    """Per-window probabilities from the torch deploy graph, membranes carried or reset."""
    graph, spec = models["graph"], models["spec"]
    state = init_state(graph, 1)
    out = []
    for w in split_windows(ev, window_us):
        if not carry:
            state = init_state(graph, 1)
        frames = torch.from_numpy(frames_from_events(w, spec))
        steps = []
        for f in frames:
            vals, state = step_graph(graph, f[None], state)
            steps.append(vals[graph.output][0])
        out.append(softmax(torch.stack(steps).mean(0).double().numpy()))
    return out


@pytest.mark.parametrize("state", ["carry", "reset"])
def test_cli_infer_windows(models, tmp_path, state):
    ev = random_events(7, n=6000, duration_us=250_000)
    write_events(tmp_path / "long.npz", ev, SENSOR)
    res = CliRunner().invoke(
        app, ["infer", str(models["stream"]), str(tmp_path / "long.npz"), "--window-ms", "100", "--state", state, "--json"]
    )
    assert res.exit_code == 0, res.output
    preds = json.loads(res.output)["predictions"]
    want = _windows_reference(models, ev, 100_000, carry=state == "carry")
    assert len(preds) == len(want) == 3
    assert sum(p["events"] for p in preds) == len(ev)
    for p, w in zip(preds, want):
        np.testing.assert_allclose(p["probabilities"], w, atol=1e-5)
    if state == "reset":  # a window on its own is a sample: the unrolled model agrees
        res = CliRunner().invoke(app, ["infer", str(models["unrolled"]), str(tmp_path / "long.npz"), "--window-ms", "100", "--json"])
        assert res.exit_code == 0, res.output
        for p, q in zip(json.loads(res.output)["predictions"], preds):
            np.testing.assert_allclose(p["probabilities"], q["probabilities"], atol=1e-5)


def test_classifier_api(models):
    ev = random_events(11)
    for mode in ("unrolled", "stream"):
        clf = EventClassifier(models[mode], provider="cpu")
        p = clf.predict(ev)
        want = torch_probs(models["run"], models["spec"], ev)
        assert p.index == int(np.argmax(want)) and p.label == CLASSES[p.index]
        np.testing.assert_allclose(p.probabilities, want, atol=1e-5)
        assert p.t_range_us == (int(ev["t"][0]), int(ev["t"][-1])) and p.latency_ms > 0
    clf = EventClassifier(models["stream"])
    chunks = split_windows(ev, 50_000)
    carried = [p.probabilities for p in clf.stream(chunks)]
    for got, want in zip(carried, _windows_reference(models, ev, 50_000, carry=True)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    single = [clf.predict(c).probabilities for c in chunks]
    for got, want in zip(clf.stream(chunks, carry_state=False), single):
        np.testing.assert_allclose(got.probabilities, want, atol=1e-6)
    assert not np.allclose(carried[1], single[1])  # carrying state does change later windows
    with pytest.raises(InferenceError, match="stream-mode"):
        list(EventClassifier(models["unrolled"]).stream(chunks))


def test_split_windows():
    ev = np.zeros(5, EVENT_DTYPE)
    ev["t"] = [100, 150, 399, 400, 1000]
    parts = split_windows(ev, 300)
    assert [list(p["t"]) for p in parts] == [[100, 150, 399], [400], [], [1000]]
    assert split_windows(ev[:0], 300) == []


def test_cli_infer_errors(models, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.arange(3), y=np.arange(3))  # no t, no p
    res = CliRunner().invoke(app, ["infer", str(models["unrolled"]), str(bad)])
    assert res.exit_code == 1 and "bad.npz" in res.output and "error" in res.output
    garbage = tmp_path / "junk.bin"
    garbage.write_bytes(b"\x01\x02\x03")  # truncated ATIS record
    res = CliRunner().invoke(app, ["infer", str(models["unrolled"]), str(garbage), "--json"])
    assert res.exit_code == 1 and "junk.bin" in res.output

    plain = tmp_path / "plain.onnx"  # a valid ONNX model without tmkt metadata
    h = onnx.helper
    node = h.make_node("Relu", ["x"], ["y"])
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", 1, [1, 3])], [h.make_tensor_value_info("y", 1, [1, 3])])
    onnx.save(h.make_model(g), str(plain))
    onnx.checker.check_model(str(plain))
    res = CliRunner().invoke(app, ["infer", str(plain), str(bad)])
    assert res.exit_code == 1 and "no tmkt metadata" in res.output
    with pytest.raises(MetadataError, match="no tmkt metadata"):
        EventClassifier(plain)
    res = CliRunner().invoke(app, ["infer", str(tmp_path / "none.onnx"), str(bad)])
    assert res.exit_code == 1 and "no such model" in res.output


def test_cli_infer_provider(models, tmp_path):
    write_events(tmp_path / "a.npz", random_events(1), SENSOR)
    res = CliRunner().invoke(app, ["infer", str(models["stream"]), str(tmp_path / "a.npz"), "--provider", "cuda", "--json"])
    if res.exit_code == 0:  # a machine with a working CUDA provider
        assert json.loads(res.output)["provider"] == "CUDAExecutionProvider"
    else:
        assert res.exit_code == 1 and "CUDA" in res.output
    res = CliRunner().invoke(app, ["infer", str(models["stream"]), str(tmp_path / "a.npz"), "--provider", "tpu"])
    assert res.exit_code != 0 and "--provider" in res.output


def test_cli_infer_usage_errors(models, tmp_path):
    """Regressions: carry on an unrolled model, sub-µs windows, a netx file as MODEL, empty recordings."""
    write_events(tmp_path / "a.npz", random_events(2), SENSOR)
    a = str(tmp_path / "a.npz")
    runner = CliRunner(env={"COLUMNS": "400"})  # wide: rich must not wrap the messages
    res = runner.invoke(app, ["infer", str(models["unrolled"]), a, a, "--window-ms", "50", "--state", "carry"])
    assert res.exit_code == 2 and "--mode stream" in res.output and "carry_state" not in res.output
    res = runner.invoke(app, ["infer", str(models["stream"]), a, "--window-ms", "0.0001"])
    assert res.exit_code == 2 and "--window-ms" in res.output
    net = tmp_path / "model.net"
    net.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 32)
    res = runner.invoke(app, ["infer", str(net), a])
    assert res.exit_code == 1 and "model.net" in res.output and "--target onnx" in res.output
    write_events(tmp_path / "empty.npz", random_events(3)[:0], SENSOR)
    res = runner.invoke(app, ["infer", str(models["stream"]), str(tmp_path / "empty.npz"), "--window-ms", "50"])
    assert res.exit_code == 0 and "no events" in res.output


def test_cli_infer_warns_about_events_outside_the_sensor(models, tmp_path):
    """Events beyond the model's sensor are dropped by binning; infer says how many, per file."""
    ev = random_events(4, n=500)
    ev["x"][:37] = SENSOR[0] + 3  # 37 events right of the model's sensor
    write_events(tmp_path / "wide.npz", ev, (SENSOR[0] + 10, SENSOR[1]))
    write_events(tmp_path / "fits.npz", random_events(5, n=500), SENSOR)
    res = CliRunner().invoke(app, ["infer", str(models["unrolled"]), str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert len(doc["predictions"]) == 2 and len(doc["warnings"]) == 1
    assert doc["warnings"][0]["file"].endswith("wide.npz") and "37 of 500 events" in doc["warnings"][0]["warning"]
    res = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["infer", str(models["unrolled"]), str(tmp_path / "wide.npz")])
    assert res.exit_code == 0 and "warning:" in res.output and "are dropped" in res.output


def test_cli_infer_flags_an_empty_recording(models, tmp_path):
    write_events(tmp_path / "empty.npz", np.zeros(0, EVENT_DTYPE), SENSOR)
    res = CliRunner().invoke(app, ["infer", str(models["unrolled"]), str(tmp_path / "empty.npz"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert len(doc["predictions"]) == 1 and doc["predictions"][0]["events"] == 0
    assert any("no events" in w["warning"] for w in doc["warnings"])


def test_classifier_warns_about_input_it_cannot_see(models):
    """The warnings live in the library: an EventClassifier user sees them without the CLI."""
    from tmkt.runtime.classifier import InputWarning

    clf = EventClassifier(models["stream"], provider="cpu")
    ev = random_events(4, n=500)
    ev["x"][:37] = SENSOR[0] + 3
    with pytest.warns(InputWarning, match="37 of 500 events lie outside"):
        clf.predict(ev)
    with pytest.warns(InputWarning, match="37 of 500 events lie outside"):  # once per stream, with the totals
        list(clf.stream([ev[:250], ev[250:]]))
    with pytest.warns(InputWarning, match="no events"):
        clf.predict(ev[:0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        clf.predict(random_events(5, n=500))  # inside the sensor: silent
