"""NIR export: written, read back by nir itself, and equal to the deploy graph spike for spike."""

import json

import h5py
import nir
import numpy as np
import pytest
import torch

from tmkt.export.graph import LIF, Add, AvgPool2d, Conv2d, Dense, DeployGraph, Flatten, GraphError, Input, lower, run_graph
from tmkt.export.nir import export_nir, graph_to_nir, read_nir
from tmkt.models import ModelConfig, NeuronConfig, build_model, randomize_batchnorm


@pytest.mark.parametrize("backbone,size", [("small", (16, 16)), ("resnet18", (16, 16))])
def test_nir_round_trip_equals_deploy_graph(tmp_path, backbone, size):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(ModelConfig(backbone=backbone, input_size=size, width=0.25,
                                               neuron=NeuronConfig(tau=3.0, v_threshold=0.5))))
    g = lower(model, {"timesteps": 5, "class_names": [str(i) for i in range(10)]})
    report = export_nir(g, tmp_path / "m.nir")
    assert report.figures["spikes_identical"] and report.figures["max_abs_logit_diff"] <= 1e-6
    # nir itself reads the file (type-checked), with one node per deploy node (Add folded into edges,
    # Flatten + Dense written as one Conv2d over the map) plus Output
    ng = nir.read(str(tmp_path / "m.nir"))
    n_add = sum(isinstance(n, (Add, Flatten)) for n in g.nodes.values())
    assert len(ng.nodes) == len(g.nodes) - n_add + 1
    assert json.loads(ng.metadata["tmkt"])["meta"]["timesteps"] == 5
    name, lif = next((k, n) for k, n in ng.nodes.items() if isinstance(n, nir.LIF))
    # forward Euler with dt = 1e-4 s: v += (dt/tau_nir) * (-v + r I') == v - v/tau + I, where the gain tau
    # is folded into the synapse (I' = tau I, r = 1) unless an Add feeds the LIF (then r = tau)
    assert np.allclose(lif.tau, 3.0e-4) and np.all(lif.v_threshold < 0.5)
    assert np.float32(lif.v_threshold.flat[0]) == np.nextafter(np.float32(0.5), np.float32(0))
    (src,) = [s for s, d in ng.edges if d == name]
    if isinstance(g.nodes[src], Conv2d):
        assert np.allclose(lif.r, 1.0) and np.allclose(ng.nodes[src].weight, 3.0 * g.nodes[src].weight, rtol=1e-6)
    else:
        assert np.allclose(lif.r, 3.0)
    assert not any(isinstance(n, nir.AvgPool2d) for n in ng.nodes.values())  # SumPool2d: every importer maps it
    back = read_nir(tmp_path / "m.nir")
    x = (torch.rand(5, 3, *g.input_shape) < 0.4).float()
    a, b = run_graph(g, x), run_graph(back, x)
    assert torch.equal(a["step_logits"], b["step_logits"])
    assert list(a["spikes"]) == list(b["spikes"])


def test_hand_graph_weights_survive(tmp_path):
    rng = np.random.default_rng(0)
    g = DeployGraph(
        {
            "input": Input((2, 6, 6)),
            "conv": Conv2d(rng.normal(size=(4, 1, 3, 3)), rng.normal(size=4), stride=2, padding=1, dilation=1, groups=2),
            "lif": LIF(2.0, 0.3),
            "pool": AvgPool2d(3, 3),
            "flat": Flatten(),
            "head": Dense(rng.normal(size=(3, 4)), rng.normal(size=3)),
        },
        {"input": (), "conv": ("input",), "lif": ("conv",), "pool": ("lif",), "flat": ("pool",), "head": ("flat",)},
        output="head",
    )
    export_nir(g, tmp_path / "h.nir")
    back = read_nir(tmp_path / "h.nir")
    np.testing.assert_array_equal(back.nodes["conv"].weight, g.nodes["conv"].weight)
    assert back.nodes["conv"].groups == 2 and back.nodes["conv"].stride == (2, 2)
    assert back.nodes["pool"].kernel_size == (3, 3)
    with h5py.File(tmp_path / "h.nir") as f:
        assert "version" in f


def test_foreign_file_is_a_named_error(tmp_path):
    bad = tmp_path / "bad.nir"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(GraphError, match="bad.nir"):
        read_nir(bad)


def test_non_tmkt_neuron_is_rejected():
    ng = nir.NIRGraph(
        nodes={"input": nir.Input(input_type={"input": np.array([3, 1, 1])}),
               "lif": nir.LIF(tau=np.full((3, 1, 1), 2.0), r=np.full((3, 1, 1), 1.0), v_leak=np.zeros((3, 1, 1)), v_threshold=np.ones((3, 1, 1))),
               "output": nir.Output(output_type={"output": np.array([3, 1, 1])})},
        edges=[("input", "lif"), ("lif", "output")], type_check=False)
    from tmkt.export.nir import nir_to_graph
    with pytest.raises(GraphError, match="lif"):
        nir_to_graph(ng)
