"""Profiler counts against counts made on paper and against an unfolded-convolution brute force."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from tmkt.export.graph import LIF, AvgPool2d, Conv2d, Dense, DeployGraph, Flatten, Input, lower, run_graph
from tmkt.hw_profiles import parse_profile
from tmkt.runtime.energy import estimate_energy
from tmkt.runtime.profile_report import FORMAT, plot_profile, profile_dict
from tmkt.runtime.profiler import profile_graph


def _layer(profile, name):
    (layer,) = [layer for layer in profile.layers if layer.name == name]
    return layer


def _hw(**fields):
    data = {"name": "test", "description": "unit test", "event_driven": True, **fields}
    data["sources"] = {k: "unit test" for k in fields if k.endswith(("_pj", "_mw", "_us"))}
    return parse_profile(data, "<test>")


# ---------------------------------------------------------------- hand-built network A
# input (2, 4, 4) -> conv1: 2 groups, k3, stride 2, padding 1 -> (2, 2, 2) -> lif1 -> flatten -> head (3)
#
# Rows covered by output row 0: {-1, 0, 1}; by output row 1: {1, 2, 3}. So the fan-out of input
# row r is (1, 2, 1, 1)[r], likewise for columns, and each group has one output channel.
# Dense per step: sum of fan-outs = (1+2+1+1)^2 = 25 per channel, 50 in all.
# Frame t=0 (event counts): ch0 (0,0)=2 (1x1=1), (1,1)=1 (2x2=4), (3,3)=1 (1); ch1 (1,2)=3 (2x1=2)
# -> 4 non-zero inputs, 8 MACs. With all-ones weights, threshold 1: ch0 outputs get 3,1,1,2 and
# ch1 outputs 0,3,0,3 -> 6 spikes -> head 6 x 3 = 18 ACs. Frame t=1 is empty: no ops, no spikes.


def _graph_a() -> DeployGraph:
    nodes = {
        "input": Input((2, 4, 4)),
        "conv1": Conv2d(np.ones((2, 1, 3, 3)), np.zeros(2), stride=2, padding=1, groups=2),
        "lif1": LIF(tau=2.0, v_threshold=1.0),
        "flat": Flatten(),
        "head": Dense(np.ones((3, 8)), np.zeros(3)),
    }
    inputs = {"conv1": ("input",), "lif1": ("conv1",), "flat": ("lif1",), "head": ("flat",)}
    return DeployGraph(nodes, inputs, output="head")


def _frames_a() -> torch.Tensor:
    x = torch.zeros(2, 1, 2, 4, 4)
    x[0, 0, 0, 0, 0], x[0, 0, 0, 1, 1], x[0, 0, 0, 3, 3], x[0, 0, 1, 1, 2] = 2, 1, 1, 3
    return x


def test_hand_counts_strided_padded_grouped_conv_with_count_input():
    p = profile_graph(_graph_a(), _frames_a())
    conv1, lif1, head = _layer(p, "conv1"), _layer(p, "lif1"), _layer(p, "head")
    assert (conv1.dense_per_step, conv1.nonzero, conv1.ops, conv1.counted_as) == (50, 4, 8, "MAC")
    assert (lif1.neurons, lif1.spikes) == (8, 6)
    assert (head.dense_per_step, head.nonzero, head.ops, head.counted_as) == (24, 6, 18, "AC")
    tot = p.totals()
    assert tot["synaptic_operations"] == {"Dense": 148, "Effective_ACs": 18, "Effective_MACs": 8}
    assert tot["neuron_updates"] == 16
    assert tot["activation_sparsity"] == pytest.approx(1 - 6 / 16)


def test_binary_first_layer_input_counts_acs():
    x = (_frames_a() > 0).float()
    conv1 = _layer(profile_graph(_graph_a(), x), "conv1")
    assert (conv1.ops, conv1.counted_as) == (8, "AC")


def test_energy_formula_on_hand_counts():
    p = profile_graph(_graph_a(), _frames_a())
    e = estimate_energy(p, _hw(e_synop_pj=1.0, e_mac_pj=10.0, e_neuron_update_pj=100.0, e_spike_pj=1000.0))
    # 18 ACs x 1 + 8 MACs x 10 + 8 neurons x 2 steps x 100 + 6 spikes x 1000
    assert (e.synops_pj, e.macs_pj, e.neurons_pj, e.spikes_pj) == (18.0, 80.0, 1600.0, 6000.0)
    assert e.total_pj == 7698.0
    assert e.ann_one_pass_pj == (50 + 24) * 10.0 and e.ann_t_passes_pj == 2 * 740.0
    assert e.ann_over_snn_one_pass == pytest.approx(740 / 7698)
    assert e.per_layer_pj == {"conv1": 80.0, "lif1": 7600.0, "head": 18.0}
    # static power: 2 mW x 3 us x 2 steps = 12 nJ
    s = estimate_energy(p, _hw(e_synop_pj=1.0, e_neuron_update_pj=0.0, static_power_mw=2.0, time_step_us=3.0))
    assert s.static_pj == pytest.approx(12000.0)
    assert s.uncosted_macs == 8 and s.macs_pj == 0.0 and s.ann_one_pass_pj is None
    # a dense device computes every connection at every step
    dense = {"name": "dense", "description": "d", "event_driven": False, "e_synop_pj": 1.0, "e_mac_pj": 10.0,
             "e_neuron_update_pj": 0.0, "sources": {"e_synop_pj": "t", "e_mac_pj": "t", "e_neuron_update_pj": "t"}}
    d = estimate_energy(p, parse_profile(dense, "<test>"))
    assert d.synops_pj == (50 + 24) * 2 * 10.0


# ---------------------------------------------------------------- hand-built network B: pooled spikes
# input (1, 5, 5) binary -> conv0 1x1 (weight 1) -> lif0 passes the frame through as spikes
# -> pool 2x2 -> (1, 2, 2); row/column 4 are dropped by the pool -> conv2 (3 out, k3, pad 1)
# Each pooled cell reaches all 4 outputs of each of 3 channels: fan-out 12, dense 4 x 12 = 48.
# Spikes: three in cell (0,0), one in cell (1,1), one at (4,4) (dropped).
# fold: 4 spikes x 12 = 48 ACs.  mac: 2 non-zero pooled cells x 12 = 24 MACs.


def _graph_b() -> DeployGraph:
    nodes = {
        "input": Input((1, 5, 5)),
        "conv0": Conv2d(np.ones((1, 1, 1, 1)), np.zeros(1)),
        "lif0": LIF(2.0, 1.0),
        "pool": AvgPool2d(2, 2),
        "conv2": Conv2d(np.ones((3, 1, 3, 3)), np.zeros(3), padding=1),
        "lif2": LIF(2.0, 1.0),
    }
    inputs = {"conv0": ("input",), "lif0": ("conv0",), "pool": ("lif0",), "conv2": ("pool",), "lif2": ("conv2",)}
    return DeployGraph(nodes, inputs, output="lif2")


def _frames_b() -> torch.Tensor:
    x = torch.zeros(1, 1, 1, 5, 5)
    for r, c in [(0, 0), (0, 1), (1, 0), (3, 3), (4, 4)]:
        x[0, 0, 0, r, c] = 1
    return x


@pytest.mark.parametrize("mode,ops,kind,source", [("fold", 48, "AC", "lif0"), ("mac", 24, "MAC", "pool")])
def test_pooled_spikes_fold_or_mac(mode, ops, kind, source):
    p = profile_graph(_graph_b(), _frames_b(), pooled_inputs=mode)
    conv0, lif0, conv2 = _layer(p, "conv0"), _layer(p, "lif0"), _layer(p, "conv2")
    assert (conv0.ops, conv0.dense_per_step, conv0.counted_as) == (5, 25, "AC")
    assert lif0.spikes == 5
    assert (conv2.ops, conv2.dense_per_step, conv2.counted_as, conv2.source) == (ops, 48, kind, source)
    assert conv2.folded == (("pool",) if mode == "fold" else ())


# ---------------------------------------------------------------- independent brute force (unfold)


def brute_conv_ops(x: torch.Tensor, node: Conv2d) -> int:
    """Per output position, count the non-zero inputs in its receptive field (per group), times the
    output channels of that group; summed. x: [B, I, H, W]."""
    cols = F.unfold((x != 0).double(), node.kernel_size, node.dilation, node.padding, node.stride)
    b, _, positions = cols.shape
    per_group = cols.view(b, node.groups, -1, positions).sum(dim=(0, 2, 3))
    return int(round(float((per_group * (node.out_channels // node.groups)).sum())))


def folded_conv(node: Conv2d, k: int) -> Conv2d:
    """avgpool(k, k) then `node` as one conv on the un-pooled map (dilation 1)."""
    w = np.kron(node.weight, np.ones((1, 1, k, k), np.float32)) / (k * k)
    return Conv2d(w, node.bias, tuple(k * s for s in node.stride), tuple(k * p for p in node.padding), 1, node.groups)


CONVS = [  # out, in, kernel, stride, padding, dilation, groups, H, W
    (4, 2, 3, 1, 1, 1, 1, 7, 6),
    (6, 4, 3, 2, 1, 1, 2, 9, 8),
    (4, 4, (3, 2), (2, 1), (0, 1), (2, 1), 4, 8, 9),
    (3, 3, 5, 3, 2, 1, 3, 10, 7),
    (2, 2, 1, 2, 0, 1, 1, 5, 5),
]


def _conv(out, cin, k, s, p, d, g, seed=0):
    k = k if isinstance(k, tuple) else (k, k)
    w = torch.randn(out, cin // g, *k, generator=torch.Generator().manual_seed(seed)).numpy()
    return Conv2d(w, np.zeros(out, np.float32), s, p, d, g)


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_ops_match_unfold_brute_force(cfg):
    out, cin, k, s, p, d, g, h, w = cfg
    conv = _conv(out, cin, k, s, p, d, g)
    graph = DeployGraph({"input": Input((cin, h, w)), "conv": conv}, {"conv": ("input",)}, output="conv")
    x = (torch.rand(3, 2, cin, h, w, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    layer = _layer(profile_graph(graph, x), "conv")
    assert layer.ops == sum(brute_conv_ops(x[t], conv) for t in range(3))
    # with every input non-zero the effective count is the dense count
    dense = _layer(profile_graph(graph, torch.ones(1, 1, cin, h, w)), "conv")
    assert dense.ops == dense.dense_per_step == brute_conv_ops(torch.ones(1, cin, h, w), conv)


@pytest.mark.parametrize("cfg", [c for c in CONVS if c[5] == 1])
def test_folded_pool_ops_match_explicit_folded_conv(cfg):
    out, cin, k, s, p, _, g, h, w = cfg
    conv = _conv(out, cin, k, s, p, 1, g, seed=2)
    h, w = 2 * h + 1, 2 * w  # odd height: the pool drops the last row
    graph = DeployGraph(
        {"input": Input((cin, h, w)), "pool": AvgPool2d(2, 2), "conv": conv},
        {"pool": ("input",), "conv": ("pool",)},
        output="conv",
    )
    x = (torch.rand(2, 2, cin, h, w, generator=torch.Generator().manual_seed(3)) < 0.2).float()
    layer = _layer(profile_graph(graph, x), "conv")
    fc = folded_conv(conv, 2)
    crop = x[..., : 2 * (h // 2), : 2 * (w // 2)]
    # the fold is exact: the folded conv on spikes gives the same currents
    wt = torch.from_numpy(fc.weight)
    for t in range(2):
        ref = F.conv2d(F.avg_pool2d(x[t], 2), torch.from_numpy(conv.weight), None, conv.stride, conv.padding, 1, g)
        got = F.conv2d(crop[t], wt, None, fc.stride, fc.padding, 1, g)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert layer.source == "input" and layer.counted_as == "AC"
    assert layer.ops == sum(brute_conv_ops(crop[t], fc) for t in range(2))


@pytest.fixture(scope="module")
def small_net():
    from tmkt.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="small", num_classes=4, input_size=(16, 16)))
    _randomize_bn(model)
    return model


def _randomize_bn(model):
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.15 + 0.05)


def test_real_model_matches_brute_force_over_spike_tensors(small_net):
    g = lower(small_net)
    x = torch.poisson(torch.full((3, 2, 2, 16, 16), 0.4), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 3])
    prof = profile_graph(g, x, labels)
    ref = run_graph(g, x)
    for name, s in ref["spikes"].items():
        assert _layer(prof, name).spikes == int(s.sum())
    assert 0 < prof.totals()["firing_rate"] < 0.9  # the randomized BN makes it spike
    spikes = {"input1": x, **ref["spikes"]}
    T = x.shape[0]
    for layer in prof.synaptic:
        node = g.nodes[layer.name]
        src = spikes[layer.source]
        if isinstance(node, Conv2d):
            if layer.folded:
                (pool,) = layer.folded
                k = g.nodes[pool].kernel_size[0]
                fc = folded_conv(node, k)
                want = sum(brute_conv_ops(src[t], fc) for t in range(T))
            else:
                want = sum(brute_conv_ops(src[t], node) for t in range(T))
        else:  # head: Dense after pool + flatten: every spike inside the pooled area reaches all outputs
            assert isinstance(node, Dense)
            want = int((src != 0).sum()) * node.weight.shape[0]
        assert layer.ops == want, layer.name
        assert layer.counted_as == ("MAC" if layer.source == "input1" else "AC")
    assert prof.correct == int((ref["logits"].argmax(-1) == labels).sum())


# ---------------------------------------------------------------- reports


def test_json_keys_and_png(tmp_path):
    p = profile_graph(_graph_a(), _frames_a(), torch.tensor([1]))
    hw = _hw(e_synop_pj=1.0, e_mac_pj=10.0, e_neuron_update_pj=100.0)
    doc = json.loads(json.dumps(profile_dict(p, [estimate_energy(p, hw)], {"run": "x"})))
    assert doc["format"] == FORMAT
    assert set(doc) == {"format", "meta", "layers", "totals", "energy"}
    assert {"run", "samples", "timesteps", "pooled_inputs", "accuracy"} <= set(doc["meta"])
    lif = {"name", "type", "neurons", "spikes", "firing_rate", "activation_sparsity", "neuron_updates"}
    syn = {"name", "type", "source", "folded", "counted_as", "dense_per_step", "dense", "effective_ops",
           "effective_acs", "effective_macs", "inputs_per_step", "input_nonzero", "input_sparsity"}
    assert [set(d) for d in doc["layers"]] == [syn, lif, syn]
    assert doc["layers"][0]["effective_macs"] == 8 and doc["layers"][2]["effective_acs"] == 18
    assert doc["layers"][0]["input_sparsity"] == pytest.approx(1 - 4 / 64)
    assert set(doc["totals"]) == {"neurons", "spikes", "neuron_updates", "firing_rate", "activation_sparsity",
                                  "dense_per_pass", "synaptic_operations"}
    assert set(doc["totals"]["synaptic_operations"]) == {"Dense", "Effective_ACs", "Effective_MACs"}
    e = doc["energy"]["test"]
    assert set(e) == {"event_driven", "snn_pj", "uncosted_macs", "ann_one_pass_pj", "ann_t_passes_pj",
                      "ann_over_snn_one_pass", "ann_over_snn_t_passes", "per_layer_pj", "profile"}
    assert set(e["snn_pj"]) == {"synops", "macs", "neurons", "spikes", "static", "total"}
    assert e["snn_pj"]["total"] == 18 + 80 + 1600
    png = tmp_path / "p.png"
    plot_profile(p, [estimate_energy(p, hw)], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1000, 700)


# ---------------------------------------------------------------- CLI


def _save_run(tmp_path, model):
    from tmkt.checkpoint import save_run

    cfg = {
        "data": {"name": "digits", "class_names": [str(i) for i in range(4)], "sensor_size": [20, 20, 2],
                 "input_size": [16, 16], "timesteps": 3,
                 "binning": {"by": "time", "binary": False, "shift_to_origin": False}},
        "method": {"name": "event-only"},
    }
    return save_run(tmp_path / "run", model, cfg)


def test_cli_profile_frames_file(tmp_path, small_net):
    from tmkt.cli import app

    run = _save_run(tmp_path, small_net)
    frames = np.random.default_rng(0).poisson(0.4, size=(5, 3, 2, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "s.npz", frames=frames, labels=np.array([0, 1, 2, 3, 0]))
    hw = tmp_path / "mine.toml"
    hw.write_text('name = "mine"\ndescription = "d"\nevent_driven = true\ne_synop_pj = 1.0\n'
                  'e_neuron_update_pj = 2.0\n[sources]\ne_synop_pj = "s"\ne_neuron_update_pj = "s"\n')
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    res = CliRunner().invoke(app, ["profile", str(run), "--frames", str(tmp_path / "s.npz"), "--samples", "4",
                                   "--batch-size", "3", "--hw", f"loihi,{hw}", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["meta"]["samples"] == 4 and doc["meta"]["frames"].endswith("s.npz")
    assert set(doc["energy"]) == {"loihi", "mine"}
    # the CLI's numbers are the library's on the same four samples
    ref = profile_graph(lower(small_net), torch.from_numpy(frames[:4].swapaxes(0, 1).copy()), torch.tensor([0, 1, 2, 3]))
    assert doc["totals"] == json.loads(json.dumps(ref.totals()))
    assert doc["meta"]["accuracy"] == ref.accuracy
    assert Image.open(png).format == "PNG"


def test_cli_profile_digits(tmp_path, small_net):
    from tmkt.cli import app

    run = _save_run(tmp_path, small_net)
    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, ["profile", str(run), "--samples", "3", "--energy", "--json", str(out),
                                   "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["meta"]["dataset"] == "digits" and doc["meta"]["samples"] == 3
    assert doc["meta"]["accuracy"] is not None
    assert {"loihi", "cmos45nm-fp32", "cmos45nm-int8", "spinnaker2", "cpu", "gpu"} <= set(doc["energy"])
    assert "Energy per inference" in res.output


def test_cli_errors_are_messages(tmp_path, small_net):
    from tmkt.cli import app

    res = CliRunner().invoke(app, ["profile", str(tmp_path / "nope"), "--frames", "x.npy"])
    assert res.exit_code != 0 and "no such file or folder" in res.output and "Traceback" not in res.output
    run = _save_run(tmp_path, small_net)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\ndescription = "d"\nevent_driven = true\ne_synop_pj = "lots"\n'
                   'e_neuron_update_pj = 1.0\n[sources]\n')
    res = CliRunner().invoke(app, ["profile", str(run), "--hw", str(bad), "--frames", "x.npy"])
    assert res.exit_code != 0 and "bad.toml" in res.output and "e_synop_pj" in res.output


def test_cli_bad_output_paths_fail_before_profiling(tmp_path, small_net):
    """Regressions: --json naming a folder raised IsADirectoryError after profiling; --hw ',' named nothing."""
    from tmkt.cli import app

    run = _save_run(tmp_path, small_net)
    np.save(tmp_path / "f.npy", np.zeros((2, 3, 2, 16, 16), np.float32))
    folder = tmp_path / "out"
    folder.mkdir()
    runner = CliRunner(env={"COLUMNS": "400"})
    res = runner.invoke(app, ["profile", str(run), "--frames", str(tmp_path / "f.npy"), "--json", str(folder)])
    assert res.exit_code == 2 and "--json" in res.output and "is a folder" in res.output
    res = runner.invoke(app, ["profile", str(run), "--frames", str(tmp_path / "f.npy"), "--hw", " , "])
    assert res.exit_code == 2 and "--hw" in res.output and "names no profile" in res.output
    assert list(folder.iterdir()) == []
