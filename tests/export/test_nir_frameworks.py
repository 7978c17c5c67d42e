"""tmkt's NIR files in norse, snntorch and sinabs, each through its own NIR import, on fixed frames:
norse and snntorch give tmkt's spikes and logits; sinabs (whose neuron emits several spikes per
step and subtracts the threshold) gives exactly what a numpy/torch model of its own neuron gives on
tmkt's weights, which is how its difference from tmkt is explained (docs/nir.md)."""

import math

import numpy as np
import pytest
import torch

from tmkt.export.graph import LIF, Add, Input, lower, run_graph, synapse_forward
from tmkt.export.nir import export_nir
from tmkt.models import ModelConfig, NeuronConfig, build_model, randomize_batchnorm
from tmkt.runtime.nir_frameworks import compare_framework, run_framework

T, BATCH = 6, 3


def graph_and_frames(tau: float, v_threshold: float = 1.0):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(ModelConfig(backbone="small", input_size=(16, 16), width=0.5,
                                                        neuron=NeuronConfig(tau=tau, v_threshold=v_threshold))))
    g = lower(model, {"timesteps": T, "class_names": [str(i) for i in range(10)]})
    gen = torch.Generator().manual_seed(1)
    frames = (torch.rand((T, BATCH, *g.input_shape), generator=gen) < 0.3).float().numpy()
    return g, frames


@pytest.mark.parametrize("framework", ["norse", "snntorch"])
@pytest.mark.parametrize("tau", [2.0, 3.0])
def test_framework_gives_tmkts_spikes_and_logits(tmp_path, framework, tau):
    pytest.importorskip(framework)
    g, frames = graph_and_frames(tau)
    path = export_nir(g, tmp_path / "m.nir").path
    cmp = compare_framework(g, framework, path, frames)
    assert all(n > 0 for n in cmp["spikes"].values())  # every layer spikes: the comparison means something
    assert cmp["spikes_identical"], cmp["spike_differences"]
    assert cmp["max_abs_logit_diff"] <= 1e-5
    assert cmp["prediction_agreement"] == 1.0


def sinabs_reference(g, frames: np.ndarray, tau_steps: dict[str, float]) -> dict:
    """tmkt's deploy graph with sinabs's LIF in place of tmkt's: v = exp(-1/tau_steps) v + I,
    floor(v / v_th) spikes where v > 0 (MultiSpike), v -= spikes * v_th (MembraneSubtract)."""
    x = torch.from_numpy(frames)
    state = {n: torch.zeros(BATCH, *g.shapes[n]) for n in g.lif_names()}
    outs, spikes = [], {n: [] for n in g.lif_names()}
    for t in range(T):
        vals = {}
        for name, node in g.nodes.items():
            ins = [vals[i] for i in g.inputs[name]]
            if isinstance(node, Input):
                vals[name] = x[t]
            elif isinstance(node, Add):
                vals[name] = sum(ins)
            elif isinstance(node, LIF):
                alpha = torch.exp(-1.0 / torch.as_tensor(tau_steps[name], dtype=torch.float32))
                v = alpha * state[name] + ins[0]
                s = (v > 0) * torch.div(v, node.v_threshold, rounding_mode="trunc")
                state[name] = v - s * node.v_threshold
                vals[name] = s
                spikes[name].append(s)
            else:
                vals[name] = synapse_forward(node, ins)
        outs.append(vals[g.output])
    return {"step_logits": torch.stack(outs).numpy(), "spikes": {n: torch.stack(v).numpy() for n, v in spikes.items()}}


def test_sinabs_runs_the_sinabs_file_as_its_own_neuron_would(tmp_path):
    g, frames = graph_and_frames(2.0)
    path = export_nir(g, tmp_path / "m-sinabs.nir", flavor="sinabs").path
    got = run_framework("sinabs", path, frames)  # sinabs 3.1.3 with nir 1.0.4, in its own env
    tau_steps = {n: -1.0 / math.log1p(-1.0 / g.nodes[n].tau) for n in g.lif_names()}
    ref = sinabs_reference(g, frames, tau_steps)
    for name, s in ref["spikes"].items():
        assert s.sum() > 0
        np.testing.assert_array_equal(got["spikes"][name].reshape(s.shape), s)
    np.testing.assert_allclose(got["step_logits"].reshape(ref["step_logits"].shape), ref["step_logits"], atol=1e-5)
    # and tmkt's own neuron differs only where sinabs's membrane keeps the excess over threshold
    ours = run_graph(g, torch.from_numpy(frames))
    assert not all(np.array_equal(ours["spikes"][n].numpy(), ref["spikes"][n]) for n in ref["spikes"])
