"""netx HDF5 export: exact pooling folds, the file layout read back raw, the simulator against an
independent PyTorch integer model, errors naming the layer, and lava-dl itself (Python 3.10 env)."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tmkt.checkpoint import load_run, save_run
from tmkt.export import graph as G
from tmkt.export.netx import export_netx, read_meta, read_netx, write_netx
from tmkt.export.quantize import (
    LavaExportError,
    fold_for_netx,
    fold_pool_into_conv,
    fold_pool_into_dense,
    quantize_graph,
)
from tmkt.models import ModelConfig, build_model
from tmkt.models import randomize_batchnorm as randomize_bn
from tmkt.export.netx_sim import simulate
from tmkt.runtime.lava import lava_check, verify_with_lava


def chain(nodes, meta=None):
    names = list(nodes)
    inputs = {n: (() if i == 0 else (names[i - 1],)) for i, n in enumerate(names)}
    return G.DeployGraph(nodes, inputs, output=names[-1], meta=dict(meta or {"timesteps": 4}))




def make_run(tmp_path, backbone="small", size=(16, 16), width=0.5, timesteps=4, classes=5):
    torch.manual_seed(3)
    model = randomize_bn(build_model(ModelConfig(backbone=backbone, num_classes=classes, input_size=size, width=width)))
    data = {
        "name": "digits", "class_names": [str(i) for i in range(classes)], "sensor_size": [size[1], size[0], 2],
        "input_size": list(size), "timesteps": timesteps, "binning": {"by": "time", "binary": False},
    }
    return save_run(tmp_path / f"run-{backbone}", model, {"data": data, "method": {"name": "tmkt"}})


def geometry_net():
    """A conv net with stride, padding, dilation, groups and non-square kernels, built from nodes."""
    rng = np.random.default_rng(0)
    return chain({
        "input": G.Input((2, 9, 8)),
        "conv1": G.Conv2d(rng.normal(0, 0.5, (4, 2, 3, 2)), rng.normal(0, 0.1, 4), (2, 1), (1, 0), (1, 2), 1),
        "lif1": G.LIF(2.0, 1.0),
        "conv2": G.Conv2d(rng.normal(0, 0.5, (6, 2, 2, 3)), rng.normal(0, 0.1, 6), (1, 2), (0, 1), (2, 1), 2),
        "lif2": G.LIF(3.0, 0.8),
        "flatten": G.Flatten(),
        "head": G.Dense(rng.normal(0, 0.5, (3, 54)), rng.normal(0, 0.1, 3)),
    }, {"timesteps": 5, "class_names": ["a", "b", "c"]})


# ---------------------------------------------------------------- folding (float, exact)


@pytest.mark.parametrize(
    "pool,conv_kw,size",
    [
        ((2, 2, 0), dict(stride=1, padding=1, dilation=1, groups=1), (16, 16)),  # the small backbone's case
        ((2, 2, 0), dict(stride=2, padding=2, dilation=2, groups=2), (12, 16)),
        ((3, 2, 1), dict(stride=1, padding=0, dilation=1, groups=1), (11, 9)),
    ],
)
def test_pool_then_conv_folds_exactly(pool, conv_kw, size):
    rng = np.random.default_rng(1)
    k, s, p = pool
    conv = G.Conv2d(rng.normal(size=(6, 4 // conv_kw["groups"], 3, 3)), rng.normal(size=6), **conv_kw)
    x = torch.from_numpy(rng.normal(size=(2, 4, *size)))  # any real input, not only spikes
    want = F.conv2d(F.avg_pool2d(x, k, s, p), torch.from_numpy(conv.weight.astype(np.float64)),
                    torch.from_numpy(conv.bias.astype(np.float64)), conv.stride, conv.padding, conv.dilation, conv.groups)
    folded = fold_pool_into_conv(G.AvgPool2d(k, s, p), conv, (4, *size), "pool1")
    got = F.conv2d(x, torch.from_numpy(folded.weight.astype(np.float64)), torch.from_numpy(conv.bias.astype(np.float64)),
                   folded.stride, folded.padding, folded.dilation, folded.groups)
    assert got.shape == want.shape
    # folded weights are stored float32 by the node: exact up to float32 rounding of w / 4
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    if pool == (2, 2, 0) and conv_kw["stride"] == 1:
        assert folded.kernel_size == (6, 6) and folded.stride == (2, 2) and folded.padding == (2, 2)


def test_fold_keeps_float64_exact_through_netx_layers():
    # through fold_for_netx the weights stay float64: conv∘pool equals the folded conv to 1e-12
    rng = np.random.default_rng(2)
    g = chain({
        "input": G.Input((2, 8, 8)),
        "conv1": G.Conv2d(rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4), 1, 1), "lif1": G.LIF(2.0, 1.0),
        "pool1": G.AvgPool2d(2, 2), "conv2": G.Conv2d(rng.normal(size=(5, 4, 3, 3)), rng.normal(size=5), 1, 1),
        "lif2": G.LIF(2.0, 1.0), "pool2": G.AvgPool2d(2, 2), "flatten": G.Flatten(),
        "head": G.Dense(rng.normal(size=(3, 20)), rng.normal(size=3)),
    })
    layers = fold_for_netx(g)
    assert [fl.kind for fl in layers] == ["conv", "conv", "dense"] and layers[2].flatten
    s = torch.from_numpy((rng.random((3, 4, 8, 8)) < 0.4).astype(np.float64))
    c2 = g.nodes["conv2"]
    want = F.conv2d(F.avg_pool2d(s, 2), torch.from_numpy(c2.weight.astype(np.float64)), torch.from_numpy(c2.bias.astype(np.float64)), 1, 1)
    got = F.conv2d(s, torch.from_numpy(layers[1].weight), torch.from_numpy(layers[1].bias), layers[1].stride, layers[1].padding)
    assert torch.allclose(got, want, atol=1e-12)
    s2 = torch.from_numpy((rng.random((3, 5, 4, 4)) < 0.4).astype(np.float64))
    h = g.nodes["head"]
    want = F.avg_pool2d(s2, 2).flatten(1) @ torch.from_numpy(h.weight.astype(np.float64)).T
    got = s2.flatten(1) @ torch.from_numpy(layers[2].weight).T
    assert torch.allclose(got, want, atol=1e-12)


def test_pool_flatten_dense_fold_matches_matrix():
    rng = np.random.default_rng(3)
    dense = G.Dense(rng.normal(size=(3, 2 * 3 * 3)), np.zeros(3))
    folded = fold_pool_into_dense(G.AvgPool2d(2, 2), dense, (2, 6, 7))  # odd width: last column dropped
    x = rng.normal(size=(2, 6, 7))
    pooled = x[:, :6, :6].reshape(2, 3, 2, 3, 2).mean(axis=(2, 4))
    assert np.allclose(folded.weight @ x.ravel(), dense.weight.astype(np.float64) @ pooled.ravel(), atol=1e-6)
    assert np.all(folded.weight.reshape(3, 2, 6, 7)[:, :, :, 6] == 0)


def test_unfoldable_pool_names_the_layer():
    rng = np.random.default_rng(4)
    conv = G.Conv2d(rng.normal(size=(2, 2, 3, 3)), np.zeros(2), 1, 1)
    with pytest.raises(LavaExportError, match="pool7"):  # 9 rows pooled by 2 drop a row the padding then sees
        fold_pool_into_conv(G.AvgPool2d(2, 2), conv, (2, 9, 8), "pool7")


# ---------------------------------------------------------------- the file


def test_hdf5_layout_read_back_raw(tmp_path):
    net = quantize_graph(geometry_net())
    path = write_netx(net, tmp_path / "geo.net")
    with h5py.File(path, "r") as f:
        layer = f["layer"]
        assert sorted(layer.keys(), key=int) == ["0", "1", "2", "3", "4"]
        types = [layer[str(i)]["type"][()].decode("ascii") for i in range(5)]
        assert types == ["input", "conv", "conv", "flatten", "dense"]
        assert list(layer["0/shape"][()]) == [2, 9, 8]  # (C, H, W): netx reverses it to (W, H, C)
        c1 = layer["1"]
        assert list(c1["shape"][()]) == [4, 5, 6]
        assert list(c1["stride"][()]) == [2, 1] and list(c1["padding"][()]) == [1, 0] and list(c1["dilation"][()]) == [1, 2]
        assert int(c1["groups"][()]) == 1 and list(c1["kernelSize"][()]) == [3, 2]
        assert int(c1["inChannels"][()]) == 2 and int(c1["outChannels"][()]) == 4
        assert np.array_equal(c1["weight"][()], net.layers[0].weight) and c1["weight"].dtype == np.int32
        assert np.array_equal(c1["bias"][()], net.layers[0].bias)
        assert int(layer["2/groups"][()]) == 2
        d = layer["4"]
        assert list(d["shape"][()]) == [3] and int(d["inFeatures"][()]) == 54 and int(d["outFeatures"][()]) == 3
        for i, q in zip((1, 2, 4), net.layers):
            n = layer[f"{i}/neuron"]
            assert n["type"][()].decode("ascii") == "CUBA"
            assert int(n["iDecay"][()]) == 4096
            assert int(n["vDecay"][()]) == q.neuron.v_decay and int(n["vThMant"][()]) == q.neuron.v_th_mant
            assert int(n["refDelay"][()]) == 1 and not bool(n["gradedSpike"][()])
        assert int(layer["1/neuron/vDecay"][()]) == 2048 and int(layer["2/neuron/vDecay"][()]) == round(4096 / 3)
        assert int(layer["4/neuron/vDecay"][()]) == 0 and int(layer["4/neuron/vThMant"][()]) == 2**17 - 1
        assert int(layer["0/neuron/vThMant"][()]) == 0 and int(layer["0/neuron/vDecay"][()]) == 4096
        meta = json.loads(f["meta/json"][()])
        assert int(f["meta/timesteps"][()]) == 5 and list(f["meta/input_shape"][()]) == [2, 9, 8]
        assert [c.decode() for c in f["meta/class_names"][()]] == ["a", "b", "c"]
        assert np.allclose(f["meta/scales"][()], [q.scale for q in net.layers])
    assert meta["reset_interval"] == 5 and meta == read_meta(path)
    back = read_netx(path)
    for a, b in zip(net.layers, back.layers):
        assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias) and a.neuron == b.neuron
        assert (a.stride, a.padding, a.dilation, a.groups, a.out_shape) == (b.stride, b.padding, b.dilation, b.groups, b.out_shape)


def test_quantization_ranges_and_threshold_rule():
    net = quantize_graph(geometry_net())
    g = geometry_net()
    for q, fl in zip(net.layers, fold_for_netx(g)):
        assert -256 <= q.weight.min() and q.weight.max() <= 254 and np.abs(q.weight).max() >= 250
        # an 8-bit signed mantissa with weight exponent 1: even integers, 2 * round(W * s / 2)
        assert np.array_equal(q.weight, 2 * np.rint(fl.weight * q.scale / 2)) and not np.any(q.weight % 2)
        if fl.lif is not None:  # v > vThMant*64 <=> v >= v_th*scale for integer currents
            assert q.neuron.v_th_mant == int(np.ceil(fl.lif.v_threshold * q.scale)) - 1


# ---------------------------------------------------------------- simulator vs PyTorch integer model


def torch_integer_reference(net, spikes):
    """Independent integer model of the quantized net in PyTorch (int64 CUBA, F.conv2d currents)."""
    x = torch.from_numpy(spikes.astype(np.float64))  # [T, B, C, H, W]
    t = x.shape[0]
    outs = [x.to(torch.uint8)]
    logits = None
    for q in net.layers:
        flat = x.reshape(-1, *x.shape[2:])
        w = torch.from_numpy(q.weight.astype(np.float64))
        if q.kind == "conv":
            a = F.conv2d(flat, w, None, q.stride, q.padding, q.dilation, q.groups)
        else:
            a = flat.flatten(1) @ w.T
        a = a.round().to(torch.int64).reshape(t, -1, *a.shape[1:])
        bias = torch.from_numpy(q.bias.astype(np.int64)).reshape(-1, *([1] * (a.dim() - 3)))
        u = torch.zeros_like(a[0])
        v = torch.zeros_like(a[0])
        spk = []
        for step in range(t):
            u = torch.div(u * (4096 - q.neuron.i_decay), 4096, rounding_mode="trunc") + a[step] * 64
            v = torch.div(v * (4096 - q.neuron.v_decay), 4096, rounding_mode="trunc") + u + bias * 64
            v = v.clamp(-(2**23 - 1), 2**23 - 1)
            s = v > q.neuron.v_th_mant * 64
            v = torch.where(s, torch.zeros_like(v), v)
            spk.append(s)
        x = torch.stack(spk).to(torch.float64)
        outs.append(x.to(torch.uint8))
        logits = (a + bias).sum(0)
    return [o.numpy() for o in outs], logits.numpy()


def test_exported_small_model_simulator_equals_pytorch_integer_model(tmp_path):
    run = make_run(tmp_path, size=(16, 16), width=0.5, timesteps=4)
    path = export_netx(G.lower_run(load_run(run)), tmp_path / "small.net", source_run=run).path
    net = read_netx(path)
    assert [q.kind for q in net.layers] == ["conv", "conv", "conv", "dense"]
    assert net.layers[1].weight.shape[2:] == (6, 6) and net.layers[1].stride == (2, 2)
    spikes = (np.random.default_rng(5).random((4, 6, 2, 16, 16)) < 0.3).astype(np.uint8)
    sim = simulate(net, spikes)
    ref, logits = torch_integer_reference(quantize_graph(G.lower_run(load_run(run))), spikes)
    assert len(sim.spikes) == len(ref) == 5
    for a, b in zip(sim.spikes, ref):
        assert np.array_equal(a, b)
    assert sum(int(s.sum()) for s in sim.spikes[1:]) > 100  # the comparison is not between silent nets
    assert np.array_equal(sim.readout_current, logits)
    assert np.array_equal(sim.readout_v[-1], logits * 64)  # in range: the membrane holds the logit sum
    meta = read_meta(path)
    assert meta["timesteps"] == 4 and meta["class_names"] == ["0", "1", "2", "3", "4"] and meta["tmkt_version"]
    assert meta["neuron"] == {"tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0} and meta["input_shape"] == [2, 16, 16]


def test_quantized_prediction_tracks_the_float_graph(tmp_path):
    # 8-bit weights and 1/64 membrane steps: the integer net mostly agrees with the float deploy graph
    g = G.lower_run(load_run(make_run(tmp_path, size=(16, 16), width=1.0, timesteps=6)))
    spikes = (np.random.default_rng(6).random((6, 64, 2, 16, 16)) < 0.25).astype(np.uint8)
    sim = simulate(quantize_graph(g), spikes)
    ref = G.run_graph(g, torch.from_numpy(spikes.astype(np.float32)))
    agree = float((ref["logits"].argmax(1).numpy() == sim.prediction).mean())
    lif_names = g.lif_names()
    match = np.mean([(sim.spikes[i + 1] == ref["spikes"][n].numpy()).mean() for i, n in enumerate(lif_names)])
    assert agree >= 0.8 and match > 0.97


# ---------------------------------------------------------------- errors naming the layer


def test_errors_name_the_layer(tmp_path):
    rng = np.random.default_rng(7)
    base = dict(input=G.Input((2, 4, 4)), conv1=G.Conv2d(rng.normal(size=(2, 2, 3, 3)), np.zeros(2), 1, 1))
    head = G.Dense(rng.normal(size=(2, 32)), np.zeros(2))
    with pytest.raises(LavaExportError, match="lif1.*reset"):
        quantize_graph(chain({**base, "lif1": G.LIF(2.0, 1.0, v_reset=0.5), "flatten": G.Flatten(), "head": head}))
    with pytest.raises(LavaExportError, match="'pool1'.*between 'conv1' and its neuron"):
        quantize_graph(chain({**base, "pool1": G.AvgPool2d(2, 2), "lif1": G.LIF(2.0, 1.0), "flatten": G.Flatten(),
                              "head": G.Dense(rng.normal(size=(2, 8)), np.zeros(2))}))
    with pytest.raises(LavaExportError, match="'lif1'.*non-binary input"):
        quantize_graph(chain({"input": G.Input((2, 4, 4)), "pool1": G.AvgPool2d(2, 2), "lif1": G.LIF(2.0, 1.0),
                              "flatten": G.Flatten(), "head": G.Dense(rng.normal(size=(2, 8)), np.zeros(2))}))
    with pytest.raises(LavaExportError, match="'conv2' reads the current of 'conv1'"):
        quantize_graph(chain({**base, "conv2": G.Conv2d(rng.normal(size=(2, 2, 1, 1)), np.zeros(2)),
                              "lif1": G.LIF(2.0, 1.0), "flatten": G.Flatten(), "head": head}))
    tiny = dict(input=G.Input((2, 4, 4)), conv1=G.Conv2d(rng.normal(size=(2, 2, 3, 3)) * 1e-4, np.zeros(2), 1, 1))
    with pytest.raises(LavaExportError, match="conv1\\+lif1.*vThMant"):
        quantize_graph(chain({**tiny, "lif1": G.LIF(2.0, 1.0), "flatten": G.Flatten(), "head": head}))
    big_bias = dict(input=G.Input((2, 4, 4)), conv1=G.Conv2d(rng.normal(size=(2, 2, 3, 3)), np.full(2, 1e4), 1, 1))
    with pytest.raises(LavaExportError, match="conv1\\+lif1.*bias overflows"):
        quantize_graph(chain({**big_bias, "lif1": G.LIF(2.0, 1.0), "flatten": G.Flatten(), "head": head}))
    resnet = make_run(tmp_path, backbone="resnet18", size=(16, 16), width=0.125)
    with pytest.raises(LavaExportError, match="'add1'.*residual"):
        export_netx(G.lower_run(load_run(resnet)), tmp_path / "resnet.net")
    assert not (tmp_path / "resnet.net").exists()


# ---------------------------------------------------------------- lava-dl itself


def test_lava_dl_equals_simulator_on_exported_model(tmp_path):
    """lava-dl 0.6.0 (fixed_pt) runs the exported small model: every layer spike for spike."""
    run = make_run(tmp_path, size=(16, 16), width=0.5, timesteps=4)
    report = export_netx(G.lower_run(load_run(run)), tmp_path / "small.net", lava_check=lava_check())  # builds the lava env if absent
    path = report.path
    assert report.checks["lava-dl vs simulator"] == "identical (4 of 4 check samples)" and report.checks["netx read-back"] == "identical"
    spikes = (np.random.default_rng(8).random((2, 4, 2, 16, 16)) < 0.3).astype(np.uint8)  # [N, T, C, H, W]
    report = verify_with_lava(path, spikes)
    assert report["layers"] == 5 and report["spikes"] > 50
    assert read_meta(path)["check"]["lava"] == {"layers": 5, "spikes": read_meta(path)["check"]["lava"]["spikes"],
                                                "samples": 4, "identical": True}


def test_lava_dl_equals_simulator_on_conv_geometry(tmp_path):
    """stride, padding, dilation, groups, non-square kernels; 3 samples back to back (reset per sample)."""
    net = quantize_graph(geometry_net())
    path = write_netx(net, tmp_path / "geo.net")
    spikes = (np.random.default_rng(9).random((3, 5, 2, 9, 8)) < 0.35).astype(np.uint8)
    report = verify_with_lava(path, spikes)
    assert report["layers"] == 4 and report["spikes"] > 100
    # negative control: the same check sees a kernel that is not flipped the way netx flips it
    bad = read_netx(path)
    bad.layers[0].weight = bad.layers[0].weight[:, :, ::-1, ::-1].copy()
    good = simulate(read_netx(path), spikes.transpose(1, 0, 2, 3, 4))
    assert not np.array_equal(simulate(bad, spikes.transpose(1, 0, 2, 3, 4)).spikes[1], good.spikes[1])


def test_lava_check_runs_as_many_samples_as_fit_its_budget(tmp_path, monkeypatch):
    """lava-dl takes ~13 s per step for a VGG-SNN at 48x48: the export's check runs 1 sample of it
    (spread over the check samples: the first, a real one, kept), all 8 of a small model, and
    gives lava a timeout from the estimate."""
    from types import SimpleNamespace

    import tmkt.runtime.lava as lava_mod

    def layers(*shapes):
        return [SimpleNamespace(out_shape=s) for s in shapes]

    vgg = SimpleNamespace(input_shape=(2, 48, 48), layers=layers(
        (32, 48, 48), (64, 48, 48), (128, 24, 24), (128, 24, 24), (256, 12, 12), (256, 12, 12), (256, 6, 6),
        (256, 6, 6), (10,)))
    small = SimpleNamespace(input_shape=(2, 32, 32), layers=layers((16, 32, 32), (32, 16, 16), (64, 8, 8), (10,)))
    assert lava_mod.lava_samples(vgg, 8, 10) == 1 and 200 < lava_mod.lava_estimate(vgg, 1, 10) < 300
    assert lava_mod.lava_samples(small, 8, 8) == 8

    run = make_run(tmp_path, size=(16, 16), width=0.5, timesteps=4)
    path = export_netx(G.lower_run(load_run(run)), tmp_path / "m.net").path
    seen = {}

    def fake_lava(p, spikes, lava_env=None, timeout=600.0):
        seen.update(samples=spikes.shape[0], first=spikes[0].copy(), timeout=timeout)
        raise lava_mod.LavaError("stop here")

    monkeypatch.setattr(lava_mod, "run_in_lava", fake_lava)
    spikes = (np.random.default_rng(8).random((8, 4, 2, 16, 16)) < 0.3).astype(np.uint8)
    monkeypatch.setattr(lava_mod, "LAVA_S_PER_NEURON_STEP", 1.0)  # pretend lava is very slow: 1 sample fits
    with pytest.raises(lava_mod.LavaError, match="stop here"):
        verify_with_lava(path, spikes, budget_s=lava_mod.lava_estimate(read_netx(path), 1, 4))
    assert seen["samples"] == 1 and np.array_equal(seen["first"], spikes[0]) and seen["timeout"] > 600


def test_calibration_readout_range_is_the_full_simulation_s(tmp_path, monkeypatch):
    """The export's readout-in-range check on the calibration uses the hidden spikes the quantizer
    already simulated: the same verdict as simulating the whole network again; a sample out of
    range refuses the file."""
    import tmkt.export.netx_sim as sim_mod
    from tmkt.export.netx import LavaExportError

    graph = G.lower_run(load_run(make_run(tmp_path, size=(16, 16), width=0.5, timesteps=4)))
    calibration = (np.random.default_rng(2).random((4, 24, *graph.input_shape)) < 0.4).astype(np.uint8)
    net = quantize_graph(graph, calibration)
    full = simulate(net, calibration).readout_in_range
    assert net.meta["readout_range"]["calibration_out_of_range"] == int((~full).sum()) == 0
    report = export_netx(graph, tmp_path / "m.net", calibration=calibration)
    assert report.figures["calibration_readout_in_range"] == 1.0
    monkeypatch.setattr(sim_mod, "readout_in_range", lambda q, x: np.arange(x.shape[1]) != 3)  # one sample out
    with pytest.raises(LavaExportError, match="1 of 24 calibration samples leave the 24-bit range"):
        export_netx(graph, tmp_path / "bad.net", calibration=calibration)
    assert not (tmp_path / "bad.net").exists()
