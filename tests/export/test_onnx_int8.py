"""Int8 ONNX export: the Loihi export's integers in onnxruntime, spike for spike.

References: the bit-accurate Loihi simulator (`netx_sim`, which lava-dl matches in test_lava), an
independent PyTorch int64 model of the quantized network written here (F.conv2d on the folded
netx kernels, step-major, CUBA in int64), and the netx file of the same run.
"""

import copy
import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from typer.testing import CliRunner

from tmkt.checkpoint import load_run, save_run
from tmkt.cli import app
from tmkt.export import graph as G
from tmkt.export.netx import calibration_from_run, export_netx, read_netx
from tmkt.export.netx_sim import simulate, to_spikes
from tmkt.export.onnx import read_onnx_metadata
from tmkt.export.onnx_int8 import (
    Int8VerificationError,
    export_onnx_int8,
    int8_model_proto,
    int8_network,
    run_int8,
)
from tmkt.export.int_graph import quantize_residual
from tmkt.export.quantize import quantize_graph
from tmkt.models import ModelConfig, build_model, randomize_batchnorm
from tmkt.runtime.classifier import EventClassifier

BACKBONES = {"small": dict(size=(16, 16), width=0.5), "vgg": dict(size=(16, 16), width=0.125),
             "resnet18": dict(size=(16, 16), width=0.125)}


def make_run(tmp_path, backbone="small", size=(16, 16), width=0.5, timesteps=4, classes=5):
    torch.manual_seed(3)
    model = randomize_batchnorm(build_model(ModelConfig(backbone=backbone, num_classes=classes, input_size=size, width=width)))
    data = {"name": "digits", "class_names": [str(i) for i in range(classes)], "sensor_size": [size[1], size[0], 2],
            "input_size": list(size), "timesteps": timesteps, "binning": {"by": "time", "binary": True}}
    return save_run(tmp_path / f"run-{backbone}", model, {"data": data, "method": {"name": "tmkt"}})


def spikes_for(graph, samples, seed, rate=0.3):
    rng = np.random.default_rng(seed)
    return (rng.random((int(graph.meta["timesteps"]), samples, *graph.input_shape)) < rate).astype(np.uint8)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small run, its deploy graph and calibration spikes (random, for the readout's range)."""
    run_dir = make_run(tmp_path_factory.mktemp("int8"))
    graph = G.lower_run(load_run(run_dir))
    return run_dir, graph, spikes_for(graph, 32, 1)


# ---------------------------------------------------------------- export and its own verification


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("mode", ["unrolled", "stream"])
def test_int8_export_of_every_backbone_passes_its_verification(tmp_path, backbone, mode):
    graph = G.lower_run(load_run(make_run(tmp_path, backbone, **BACKBONES[backbone])))
    calibration = spikes_for(graph, 16, 2)
    report = export_onnx_int8(graph, tmp_path / "m.onnx", mode=mode, calibration=calibration, check_samples=3)
    figures = report.figures
    assert report.path.exists() and report.checks["onnx.checker"] == "ok"
    assert figures["samples"] == 6 and figures["real_samples"] == 3 and figures["fired"] > 1000
    assert not any(figures["spike_differences"].values()) and figures["current_differences"] == 0
    assert figures["twin_agrees"]
    if backbone == "resnet18":  # no netx file: the reference is the simulator's semantics over the neuron groups
        assert "integer reference (residual)" in " ".join(report.checks) and figures["chip_agreement"] is None
    else:
        assert "onnxruntime vs Loihi simulator" in report.checks and figures["chip_agreement"] == 1.0
        assert figures["pool_unfolded"] >= 1  # the pooling is run as a sum pool, not the 4x folded kernel
    meta = read_onnx_metadata(report.path)
    assert meta["precision"] == "int8" and meta["mode"] == mode and meta["input_threshold"] == 0.5
    types = {n.op_type for n in onnx.load(str(report.path)).graph.node}
    assert "MatMulInteger" in types and not types & {"Conv", "MatMul", "Gemm"}  # every synapse is integer


def test_residual_quantizer_gives_the_netx_integers_on_a_chain(small):
    """quantize_residual (per neuron group) on a chain = quantize_graph: one quantizer's rules."""
    _, graph, calibration = small
    chain, groups = quantize_graph(graph, calibration), quantize_residual(graph, calibration)
    assert len(chain.layers) == len(groups.groups)
    for q, grp in zip(chain.layers, groups.groups):
        (g,) = grp.layers
        assert np.array_equal(q.weight, g.weight) and np.array_equal(q.bias, g.bias)
        assert q.neuron == g.neuron and q.scale == g.scale


def test_large_batches_run_in_chunks_with_the_same_result(small, monkeypatch):
    """A batch larger than the memory budget allows (512 calibration samples of a VGG-SNN would
    take 10s of GB at once) runs in chunks of samples, with results identical to one pass."""
    import tmkt.export.netx_sim as sim_mod
    from tmkt.export.int_graph import simulate_groups
    from tmkt.export.netx_sim import hidden_spikes, run_cuba

    _, graph, calibration = small
    spikes = calibration[:, :7]
    net = quantize_graph(graph, spikes)
    whole = simulate(net, spikes)
    groups = quantize_residual(graph, spikes)
    whole_groups = simulate_groups(groups, spikes)
    hidden = hidden_spikes(net.layers[:-1], spikes)
    shapes = [graph.input_shape] + [q.out_shape for q in net.layers]
    monkeypatch.setattr(sim_mod, "SIM_BYTES", 2 * 8 * 8 * 4 * max(int(np.prod(s)) for s in shapes))
    assert sim_mod.sample_chunk(4, shapes) == 2  # 2 samples at a time: 4 chunks of the 7
    calls = []
    monkeypatch.setattr(sim_mod, "run_cuba", lambda *a: calls.append(a[0].shape[1]) or run_cuba(*a))
    for a, b in zip(simulate(net, spikes).spikes, whole.spikes):
        assert np.array_equal(a, b)
    assert set(calls) == {1, 2}  # the chunks ran, none whole
    chunked = simulate(net, spikes, keep_spikes=False)
    assert chunked.spikes == [] and np.array_equal(chunked.readout_v, whole.readout_v)
    assert np.array_equal(chunked.readout_current, whole.readout_current)
    assert np.array_equal(chunked.readout_in_range, whole.readout_in_range)
    assert np.array_equal(hidden_spikes(net.layers[:-1], spikes), hidden)
    assert quantize_graph(graph, spikes).layers[-1].scale == net.layers[-1].scale
    got = simulate_groups(groups, spikes)
    assert np.array_equal(got["readout_current"], whole_groups["readout_current"])
    assert all(np.array_equal(got["spikes"][k], whole_groups["spikes"][k]) for k in whole_groups["spikes"])


def test_residual_group_shares_one_scale_and_keeps_the_identity_shortcut(tmp_path):
    graph = G.lower_run(load_run(make_run(tmp_path, "resnet18", width=0.125)))
    net = quantize_residual(graph, spikes_for(graph, 8, 0))
    add_groups = [grp for grp in net.groups if len(grp.layers) == 2]
    assert len(add_groups) == 8  # one per basic block
    for grp in add_groups:
        assert grp.layers[0].scale == grp.layers[1].scale and grp.layers[0].neuron == grp.layers[1].neuron
        assert not grp.layers[1].bias.any()  # the group's bias lives in its first synapse
        w = grp.layers[1].weight
        if grp.layers[1].name.split("+")[0].endswith("_identity"):  # identity: weight 2*round(s/2) on the diagonal
            assert np.array_equal(w[:, :, 0, 0], np.eye(w.shape[0], dtype=w.dtype) * w[0, 0, 0, 0])
            assert w[0, 0, 0, 0] == 2 * np.rint(grp.layers[1].scale / 2)


def shifted_threshold(group, delta):
    """`group` with its neurons' vThMant moved by `delta` (a copy)."""
    q = copy.copy(group.layers[0].q)
    q.neuron = replace(q.neuron, v_th_mant=q.neuron.v_th_mant + delta)
    return replace(group, layers=(replace(group.layers[0], q=q), *group.layers[1:]))


def test_verification_catches_a_builder_that_changes_spikes(small, tmp_path, monkeypatch):
    """A model whose neurons fire one unit below the chip's threshold, file and twin alike:
    the comparison with the simulator must find the differing spikes, and no file appears."""
    _, graph, calibration = small
    import tmkt.export.onnx_int8 as mod

    def low_threshold(g, c, v, group, floor, **kw):
        return original(g, c, v, shifted_threshold(group, -1), floor, **kw)

    original = mod._lif_step
    monkeypatch.setattr(mod, "_lif_step", low_threshold)
    with pytest.raises(Int8VerificationError, match="disagrees with the Loihi simulator") as info:
        export_onnx_int8(graph, tmp_path / "bad.onnx", calibration=calibration)
    report = info.value.report
    assert report.twin_agrees and report.spike_differences["lif1"] > 0
    assert not (tmp_path / "bad.onnx").exists()


def test_verification_catches_a_file_that_differs_from_its_twin(small, tmp_path, monkeypatch):
    _, graph, calibration = small
    import tmkt.export.onnx_int8 as mod

    def file_off_by_one(plan, net, mode, t, debug=False):  # only the written file has one threshold off
        if debug:
            return original(plan, net, mode, t, debug)
        return original([shifted_threshold(plan[0], -5), *plan[1:]], net, mode, t, debug)

    original = mod.int8_model_proto
    monkeypatch.setattr(mod, "int8_model_proto", file_off_by_one)
    with pytest.raises(Int8VerificationError, match="debug twin"):
        export_onnx_int8(graph, tmp_path / "bad.onnx", calibration=calibration)
    assert not (tmp_path / "bad.onnx").exists()


# ---------------------------------------------------------------- stream = unrolled, and an independent reference


def test_stream_stepped_T_times_equals_unrolled(small):
    _, graph, calibration = small
    net, plan = int8_network(graph, calibration)
    t = int(graph.meta["timesteps"])
    frames = np.random.default_rng(4).poisson(0.4, (t, 5, *graph.input_shape)).astype(np.float32)  # counts, not 0/1
    import onnxruntime as ort

    runs = {mode: run_int8(ort.InferenceSession(int8_model_proto(plan, net, mode, t, debug=True).SerializeToString(),
                                                providers=["CPUExecutionProvider"]), mode, plan, frames, debug=True)
            for mode in ("unrolled", "stream")}
    a, b = runs["unrolled"], runs["stream"]
    assert np.array_equal(a["step_logits"], b["step_logits"])
    assert np.array_equal(a["readout_current"], b["readout_current"])
    for name in a["spikes"]:
        assert np.array_equal(a["spikes"][name], b["spikes"][name]) and a["spikes"][name].any()


def test_gather_im2col_equals_the_taps_with_stride_and_dilation():
    """The im2col index (one Gather of pixels) gives, per output pixel, the taps a convolution reads."""
    from tmkt.export.onnx_int8 import _im2col_index

    rng = np.random.default_rng(0)
    for (hp, wp), taps, stride, dil in [((10, 12), (3, 3), (1, 1), (1, 1)), ((11, 9), (3, 2), (2, 1), (1, 2)),
                                        ((9, 9), (1, 1), (2, 2), (1, 1))]:
        ho, wo = (hp - dil[0] * (taps[0] - 1) - 1) // stride[0] + 1, (wp - dil[1] * (taps[1] - 1) - 1) // stride[1] + 1
        x = rng.integers(0, 255, (2, hp, wp, 3))
        got = x.reshape(2, hp * wp, 3)[:, _im2col_index(hp, wp, taps, stride, dil, (ho, wo))].reshape(2, ho, wo, -1)
        for y in range(ho):
            for xx in range(wo):
                want = [x[:, y * stride[0] + ty * dil[0], xx * stride[1] + tx * dil[1]]
                        for ty in range(taps[0]) for tx in range(taps[1])]
                assert np.array_equal(got[:, y, xx], np.concatenate(want, axis=-1))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_spike_values_carry_the_gain_within_uint8(tmp_path, backbone):
    """Spikes carry a power of two that divides each reader's gain and keeps its sum-pooled input
    in uint8; the layers whose gain the value holds run without an int32 multiply of their currents."""
    from tmkt.export.onnx_int8 import int8_mantissa, spike_values

    graph = G.lower_run(load_run(make_run(tmp_path, backbone, **BACKBONES[backbone])))
    net, plan = int8_network(graph, spikes_for(graph, 8, 2))
    values = spike_values(plan)
    rest = 0
    for group in plan:
        for layer in group.layers:
            v = values[layer.source]
            gain = (1 if group.readout else 64) << int8_mantissa(layer.weight)[1]
            pool = 1 if layer.pool is None else int(np.prod(layer.pool.kernel))
            assert v & (v - 1) == 0 and gain % v == 0 and v * pool <= 255
            rest += gain != v
    if backbone == "vgg":  # 64 << 1 = 128 on every unpooled conv; the sum-pooled ones carry 32 (x4 left)
        assert values[plan[0].layers[0].source] == 128 and rest == sum(l.pool is not None for g in plan for l in g.layers)
    model = int8_model_proto(plan, net, "unrolled", int(graph.meta["timesteps"]))
    currents = {n.output[0] for n in model.graph.node if n.op_type == "MatMulInteger"}
    assert sum(n.op_type == "Mul" and n.input[0] in currents for n in model.graph.node) == rest


def torch_int_reference(net, spikes):
    """Independent int64 PyTorch model of the quantized net, step-major: F.conv2d / linear currents
    on the folded netx kernels (float64, exact for these integers), CUBA neurons in int64.
    Returns (spikes per hidden layer [T, B, ...], readout currents [T, B, K])."""
    t, b = spikes.shape[:2]
    v = [torch.zeros((b, *q.out_shape), dtype=torch.int64) for q in net.layers[:-1]]
    out_spikes, currents = [[] for _ in net.layers[:-1]], []
    for step in range(t):
        x = torch.from_numpy(spikes[step].astype(np.float64))
        for k, q in enumerate(net.layers):
            w = torch.from_numpy(q.weight.astype(np.float64))
            if q.kind == "conv":
                a = F.conv2d(x, w, None, q.stride, q.padding, q.dilation, q.groups)
            else:
                a = x.reshape(b, -1) @ w.T
            a = a.round().to(torch.int64) + torch.from_numpy(q.bias.astype(np.int64)).reshape(-1, *([1] * (a.ndim - 2)))
            if q.readout:
                currents.append(a.numpy())
                break
            p = v[k] * (4096 - q.neuron.v_decay)
            h = (p.sign() * (p.abs() >> 12) + (a << 6)).clamp(-(2**23 - 1), 2**23 - 1)
            s = h > (q.neuron.v_th_mant << 6)
            v[k] = torch.where(s, torch.zeros_like(h), h)
            out_spikes[k].append(s.numpy().astype(np.uint8))
            x = s.to(torch.float64)
    return [np.stack(s) for s in out_spikes], np.stack(currents)


@pytest.mark.parametrize("mode", ["unrolled", "stream"])
def test_int8_spikes_equal_the_integer_reference_on_fixed_inputs(small, mode):
    _, graph, calibration = small
    net, plan = int8_network(graph, calibration)
    t = int(graph.meta["timesteps"])
    c, h, w = graph.input_shape
    yy, xx = np.mgrid[:h, :w]
    fixed = np.zeros((t, 3, c, h, w), np.uint8)  # a moving bar, a checkerboard, everything on
    for step in range(t):
        fixed[step, 0, :, :, (2 * step) % w] = 1
        fixed[step, 1] = ((yy + xx + step) % 2)[None]
        fixed[step, 2] = 1
    import onnxruntime as ort

    sess = ort.InferenceSession(int8_model_proto(plan, net, mode, t, debug=True).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = run_int8(sess, mode, plan, fixed.astype(np.float32), debug=True)
    want_spikes, want_current = torch_int_reference(net, fixed)
    for k, name in enumerate(got["spikes"]):
        assert np.array_equal(got["spikes"][name], want_spikes[k])
    assert np.array_equal(got["readout_current"], want_current)
    assert sum(int(s.sum()) for s in want_spikes) > 100
    np.testing.assert_allclose(got["step_logits"], want_current / net.layers[-1].scale, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- one quantizer: the netx file's integers


def _onnx_weights(path):
    model = onnx.load(str(path))
    return {i.name.rsplit("_", 2)[0]: numpy_helper.to_array(i) for i in model.graph.initializer if "_w_" in i.name}


def test_int8_and_netx_exports_of_one_run_carry_identical_weight_integers(small, tmp_path):
    run_dir, graph, calibration = small
    netx = read_netx(export_netx(graph, tmp_path / "m.net", calibration=calibration).path)
    path = export_onnx_int8(graph, tmp_path / "m.onnx", calibration=calibration, verify=False).path
    meta = read_onnx_metadata(path)
    weights = _onnx_weights(path)
    assert meta["quantizer"]["scales"] == [q.scale for q in netx.layers]
    assert [n.split("+")[0] for n in meta["quantizer"]["layers"]] == list(weights)
    for q, (name, m) in zip(netx.layers, weights.items()):
        assert m.dtype == np.int8
        assert np.array_equal(q.weight % 2, np.zeros_like(q.weight))  # netx: the 8-bit mantissa << 1
        o = q.weight.shape[0]
        if q.kind == "dense":  # ONNX rows in (H, W, C) order, netx columns in (C, H, W)
            w = m.T.astype(np.int64) * 2
            if len(q.in_shape) == 3:
                c, h, wd = q.in_shape
                w = w.reshape(o, h, wd, c).transpose(0, 3, 1, 2).reshape(o, -1)
            assert np.array_equal(w, q.weight)
            continue
        kh = kw = int(round(np.sqrt(m.shape[0] / q.in_shape[0])))
        small = m.reshape(kh, kw, q.in_shape[0], o).transpose(3, 2, 0, 1).astype(np.int64) * 2
        folded = small if small.shape == q.weight.shape else np.kron(small, np.ones((1, 1, 2, 2), np.int64))
        assert np.array_equal(folded, q.weight)  # sum pool 2x2 + small kernel == netx's folded kernel
    # and the netx export's weights are within Loihi's 8-bit mixed-sign range
    assert all(np.abs(q.weight).max() <= 254 for q in netx.layers)


# ---------------------------------------------------------------- tmkt export / infer / EventClassifier / eval


@pytest.fixture(scope="module")
def exported(small, tmp_path_factory):
    run_dir, _, _ = small
    runner = CliRunner()
    for mode in ("unrolled", "stream"):
        res = runner.invoke(app, ["export", str(run_dir), "--target", "onnx", "--int8", "--mode", mode])
        assert res.exit_code == 0, res.output
        assert "onnxruntime vs Loihi simulator: " in res.output and "identical" in res.output
    return run_dir


def _events(seed, n=3000, size=16, duration=40_000):
    from tmkt.data.events import EVENT_DTYPE

    rng = np.random.default_rng(seed)
    ev = np.empty(n, EVENT_DTYPE)
    ev["x"], ev["y"] = rng.integers(0, size, n), rng.integers(0, size // 2, n)  # the top half only
    ev["t"], ev["p"] = np.sort(rng.integers(0, duration, n)), rng.integers(0, 2, n)
    return ev


def test_tmkt_infer_on_int8_models_gives_the_reference_prediction(exported, tmp_path):
    from tmkt.data.spec import frames_from_events
    from tmkt.export.metadata import data_spec

    run_dir = exported
    graph = G.lower_run(load_run(run_dir))
    net = read_netx(export_netx(graph, tmp_path / "m.net", calibration=calibration_from_run(load_run(run_dir))).path)
    for mode in ("unrolled", "stream"):
        model = run_dir / f"model.{mode}.int8.onnx"
        meta = read_onnx_metadata(model)
        for seed in range(3):
            ev = _events(seed)
            np.save(tmp_path / f"rec{seed}.npy", ev)
            frames = frames_from_events(ev, data_spec(meta))  # [T, C, H, W], as tmkt infer bins
            ref = simulate(net, to_spikes(frames[:, None], 0.5))
            res = CliRunner().invoke(app, ["infer", str(model), str(tmp_path / f"rec{seed}.npy"), "--json", "--provider", "cpu"])
            assert res.exit_code == 0, res.output
            (row,) = json.loads(res.output)["predictions"]
            assert row["index"] == int(ref.exact_prediction[0]) == int(ref.prediction[0])


def test_event_classifier_streams_an_int8_stream_model_with_int32_state(exported):
    from tmkt.runtime.classifier import split_windows

    clf = EventClassifier(exported / "model.stream.int8.onnx", provider="cpu")
    state = clf.zero_state(1)
    assert all(v.dtype == np.int32 for v in state.values())
    ev = _events(7, n=6000, duration=90_000)
    preds = list(clf.stream(split_windows(ev, 30_000)))
    assert len(preds) == 3 and all(0 <= p.index < 5 for p in preds)
    # the first window starts from rest either way; later ones run on from the carried int32 membranes
    alone = list(clf.stream(split_windows(ev, 30_000), carry_state=False))
    assert preds[0].index == alone[0].index and np.array_equal(preds[0].logits, alone[0].logits)
    assert any(not np.array_equal(p.logits, q.logits) for p, q in zip(preds[1:], alone[1:]))


def test_tmkt_eval_reports_int8_accuracy_beside_float(exported):
    import torch as th

    from tmkt.data.registry import build_data_for_run

    run = load_run(exported)
    res = CliRunner().invoke(app, ["eval", str(exported / "model.unrolled.int8.onnx"), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["precision"] == "int8" and got["samples"] > 50
    test = build_data_for_run(run.config).test
    frames = np.stack([np.asarray(test[i][0], np.float32) for i in range(len(test))], axis=1)
    labels = np.asarray(test.labels)
    net = read_netx(export_netx(G.lower_run(run), exported / "check.net", calibration=calibration_from_run(run)).path)
    chip = simulate(net, to_spikes(frames, 0.5))
    assert got["accuracy"] == pytest.approx(float((chip.exact_prediction == labels).mean()))
    float_pred = G.run_graph(G.lower_run(run), th.from_numpy(frames))["logits"].argmax(1).numpy()
    assert got["float_accuracy"] == pytest.approx(float((float_pred == labels).mean()))
    res = CliRunner().invoke(app, ["eval", str(exported / "model.unrolled.int8.onnx")])
    assert res.exit_code == 0 and "int8 ONNX" in res.output and "float model" in res.output


def test_export_int8_flag_errors_and_help(small):
    run_dir, _, _ = small
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(run_dir), "--target", "lava", "--int8"])
    assert res.exit_code != 0 and "--int8" in res.output
    res = runner.invoke(app, ["export", str(run_dir), "--int8", "--opset", "13"])
    assert res.exit_code != 0 and "opset" in res.output
    assert "--int8" in runner.invoke(app, ["export", "--help"]).output
