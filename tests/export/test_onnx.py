"""ONNX export: both modes equal the PyTorch deploy graph and the spikingjelly model; metadata; CLI."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from tmkt.checkpoint import load_run, save_run
from tmkt.cli import app
from tmkt.export.graph import init_state, lower_run, run_graph, step_graph
from tmkt.export.metadata import FORMAT, MetadataError, data_spec, decode_metadata, encode_metadata
from tmkt.export.onnx import _torch_reference, compare_spikes, export_onnx, read_onnx_metadata, verify_onnx
from tmkt.models import ModelConfig, build_model, randomize_batchnorm

CLASSES = ["zero", "one", "two", "three"]
SIZE = (16, 16)
T = 4


def make_run(path, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="small", num_classes=len(CLASSES), input_size=SIZE, width=0.5))
    randomize_batchnorm(model, seed)
    config = {
        "data": {
            "name": "digits",
            "class_names": CLASSES,
            "sensor_size": [34, 34, 2],
            "input_size": list(SIZE),
            "timesteps": T,
            "binning": {"by": "time", "binary": False, "shift_to_origin": False},
        },
        "method": {"name": "tmkt"},
        "train": {},
        "metrics": {},
    }
    return save_run(path, model, config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(make_run(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def graph(run):
    return lower_run(run)


def _frames(t, b, seed):
    rng = np.random.default_rng(seed)
    return (rng.random((t, b, 2, *SIZE)) < 0.3).astype(np.float32)


def _cpu(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("t", [1, 5])
def test_unrolled_equals_deploy_graph_and_spikingjelly(graph, run, tmp_path, t):
    path = export_onnx(graph, tmp_path / "m.onnx", mode="unrolled", timesteps=t).path
    sess = _cpu(path)
    for b in (1, 5):
        x = _frames(t, b, seed=10 * t + b)
        logits, step_logits = sess.run(None, {"events": x})
        ref = run_graph(graph, torch.from_numpy(x))
        assert logits.shape == (b, len(CLASSES)) and step_logits.shape == (t, b, len(CLASSES))
        np.testing.assert_allclose(step_logits, ref["step_logits"].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits, ref["logits"].numpy(), atol=1e-5, rtol=0)
        with torch.no_grad():  # the trained (spikingjelly) network, independent of the deploy graph code
            sj = run.model(torch.from_numpy(x))["logits"].mean(0).numpy()
        np.testing.assert_allclose(logits, sj, atol=1e-5, rtol=0)
    assert len(list(tmp_path.iterdir())) == 1  # no external data file next to it


@pytest.mark.parametrize("t,b", [(1, 1), (5, 3)])
def test_stream_equals_deploy_graph_and_unrolled(graph, tmp_path, t, b):
    stream = _cpu(export_onnx(graph, tmp_path / "s.onnx", mode="stream").path)
    unrolled = _cpu(export_onnx(graph, tmp_path / "u.onnx", mode="unrolled", timesteps=t).path)
    x = _frames(t, b, seed=t)
    lifs = graph.lif_names()
    states = {f"v_{n}": np.zeros((b, *graph.shapes[n]), np.float32) for n in lifs}
    ref_state = init_state(graph, b)
    outs = []
    for k in range(t):
        res = stream.run(None, {"frame": x[k], **states})
        outs.append(res[0])
        states = {f"v_{n}": res[1 + i] for i, n in enumerate(lifs)}
        vals, ref_state = step_graph(graph, torch.from_numpy(x[k]), ref_state)
        np.testing.assert_allclose(res[0], vals[graph.output].numpy(), atol=1e-5, rtol=0)
        for n in lifs:  # membranes carried through ONNX equal the torch step functions'
            np.testing.assert_allclose(states[f"v_{n}"], ref_state[n].numpy(), atol=1e-5, rtol=0)
    _, step_logits = unrolled.run(None, {"events": x})
    np.testing.assert_allclose(np.stack(outs), step_logits, atol=1e-6, rtol=0)
    assert [i.name for i in stream.get_inputs()] == ["frame"] + [f"v_{n}" for n in lifs]
    assert [o.name for o in stream.get_outputs()] == ["logits"] + [f"v_{n}_out" for n in lifs]


@pytest.mark.parametrize("mode,opset", [("unrolled", 13), ("stream", 20)])
def test_verify_report_spikes_identical(graph, tmp_path, mode, opset):
    path = export_onnx(graph, tmp_path / "m.onnx", mode=mode, opset=opset, verify=False).path
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [opset]
    report = verify_onnx(graph, path, batch=3, seed=5)
    assert report.spikes_identical and report.spike_agreement == 1.0
    assert report.max_abs_logit_diff <= 1e-5 and report.ok


def test_verify_catches_a_wrong_model(graph, tmp_path):
    path = export_onnx(graph, tmp_path / "m.onnx", mode="unrolled").path
    proto = onnx.load(str(path))
    conv = sorted((i for i in proto.graph.initializer if len(i.dims) == 4), key=lambda i: i.name)[0]
    w = onnx.numpy_helper.to_array(conv).copy()
    w *= -1.0  # flipped filters: spikes change far from any threshold
    conv.CopyFrom(onnx.numpy_helper.from_array(w, conv.name))
    onnx.save(proto, str(path))
    report = verify_onnx(graph, path)
    assert not report.ok and not report.twin_agrees and report.max_abs_logit_diff > 1e-3
    assert "disagrees" in report.summary()


def test_compare_spikes_tells_rounding_flips_from_errors(graph):
    x = torch.from_numpy(_frames(3, 2, seed=1))
    ref = _torch_reference(graph, x)
    lif = graph.lif_names()[1]
    h = ref["charge"][lif]
    v_th = graph.nodes[lif].v_threshold
    near = np.unravel_index(np.argmin(np.abs(h[1] - v_th)), h[1].shape)  # closest call at step 1
    far = np.unravel_index(np.argmax(np.abs(h[1] - v_th)), h[1].shape)
    for idx, gap_ok in ((near, True), (far, False)):
        got = {n: s.copy() for n, s in ref["spikes"].items()}
        got[lif][1][idx] = 1 - got[lif][1][idx]
        got[lif][2] = 1 - got[lif][2]  # later divergence: not judged
        tol = float(np.abs(h[1][near] - v_th)) * 1.01 + 1e-12
        agreement, first, flips = compare_spikes(graph, ref["spikes"], ref["charge"], got, flip_tol=tol)
        assert first.startswith(f"step 1, layer {lif}: 1 spike(s)") and flips == gap_ok
        assert 0.0 < agreement < 1.0
    assert compare_spikes(graph, ref["spikes"], ref["charge"], ref["spikes"]) == (1.0, None, False)


def test_metadata_round_trip(graph, tmp_path):
    path = export_onnx(graph, tmp_path / "m.onnx", mode="stream", timesteps=7, verify=False).path
    meta = read_onnx_metadata(path)
    assert meta["tmkt_format"] == FORMAT and meta["mode"] == "stream" and meta["timesteps"] == 7
    for key in ("input_shape", "sensor_size", "binning", "class_names", "neuron", "tmkt_version", "backbone"):
        want = graph.meta[key]
        assert meta[key] == (list(want) if isinstance(want, tuple) else want), key
    assert meta["class_names"] == CLASSES and meta["input_shape"] == [2, *SIZE]
    assert meta["neuron"] == {"tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0}
    assert [s["input"] for s in meta["states"]] == [f"v_{n}" for n in graph.lif_names()]
    assert [tuple(s["shape"]) for s in meta["states"]] == [graph.shapes[n] for n in graph.lif_names()]
    spec = data_spec(meta)
    assert spec.timesteps == 7 and spec.input_size == SIZE and spec.sensor_size == (34, 34, 2)
    # the props themselves are JSON strings
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["timesteps"] == "7" and props["class_names"] == '["zero","one","two","three"]'
    assert decode_metadata(encode_metadata(meta)) == meta
    with pytest.raises(MetadataError, match="no tmkt metadata"):
        decode_metadata({"timesteps": "7"}, "x.onnx")
    with pytest.raises(MetadataError, match="class_names"):
        decode_metadata({k: v for k, v in encode_metadata(meta).items() if k != "class_names"}, "x.onnx")


def test_checker_full_and_embedded_weights(graph, tmp_path):
    path = export_onnx(graph, tmp_path / "m.onnx", mode="unrolled", verify=False).path
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    n_weights = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if len(i.dims) >= 2)
    want = sum(node.weight.size for node in graph.nodes.values() if hasattr(node, "weight"))
    assert n_weights == want  # each weight once, not once per unrolled step


def test_cli_export(tmp_path, run):
    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(app, ["export", str(run.path), "--target", "onnx", "--mode", "stream", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "spike agreement 100.000000%" in res.output and "max |dlogit|" in res.output
    assert read_onnx_metadata(out)["mode"] == "stream"
    res = CliRunner().invoke(app, ["export", str(run.path), "-T", "2", "--no-verify"])
    assert res.exit_code == 0, res.output
    assert read_onnx_metadata(run.path / "model.unrolled.onnx")["timesteps"] == 2


def test_cli_export_errors(tmp_path, run):
    res = CliRunner().invoke(app, ["export", str(run.path), "--target", "tflite"])
    assert res.exit_code != 0 and "--target" in res.output
    res = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--target", "onnx"])
    assert res.exit_code == 1 and "missing: no such file or folder" in res.output
    res = CliRunner().invoke(app, ["export", str(run.path), "--mode", "sideways"])
    assert res.exit_code != 0 and "--mode" in res.output
    res = CliRunner().invoke(app, ["export", str(run.path), "--opset", "9"])
    assert res.exit_code == 1 and "opset must be in 13..20" in res.output


def test_cli_export_missing_target_module(run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tmkt.export.netx", None)  # as if lava's exporter were absent
    res = CliRunner().invoke(app, ["export", str(run.path), "--target", "lava"])
    assert res.exit_code == 1 and "target 'lava' is not available" in res.output


def test_cli_export_out_is_a_folder(tmp_path, run):
    """Regression: --out naming a folder was a raw IsADirectoryError; now a usage error before any work."""
    folder = tmp_path / "dir"
    folder.mkdir()
    for target in ("onnx", "nir", "lava"):
        res = CliRunner().invoke(app, ["export", str(run.path), "--target", target, "--out", str(folder)])
        assert res.exit_code == 2 and "--out" in res.output and "folder" in res.output, (target, res.output)
    assert list(folder.iterdir()) == []
