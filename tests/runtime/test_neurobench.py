"""NeuroBench 2.3's own harness on tmkt networks gives tmkt's profiler numbers where the definitions coincide."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("neurobench")

from tmkt.export.graph import lower  # noqa: E402
from tmkt.models import ModelConfig, build_model, randomize_batchnorm  # noqa: E402
from tmkt.runtime.neurobench import (  # noqa: E402
    NOT_MEASURED,
    EventHeadNet,
    compare,
    deploy_parameters,
    fold_batchnorm,
    run_neurobench,
)
from tmkt.runtime.profiler import profile_graph  # noqa: E402

SIZE = (16, 16)


def _net(backbone: str, width: float = 0.5):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, num_classes=4, input_size=SIZE, width=width))
    return randomize_batchnorm(model, 3, bias_mean=0.2)


def _samples(binary: bool, n: int = 7, t: int = 4):
    rng = np.random.default_rng(1)
    frames = rng.poisson(0.4, size=(n, t, 2, *SIZE)).astype(np.float32)
    if binary:
        frames = (frames > 0).astype(np.float32)
    return frames, rng.integers(0, 4, n)


def _profiles(model, frames, labels):
    g = lower(model)
    x = torch.from_numpy(np.ascontiguousarray(frames.swapaxes(0, 1)))
    y = torch.from_numpy(labels)
    return g, profile_graph(g, x, y, pooled_inputs="mac"), profile_graph(g, x, y, pooled_inputs="fold")


@pytest.mark.parametrize("backbone,binary", [("small", False), ("small", True), ("resnet18", True)])
def test_neurobench_equals_tmkt_mac_profile(backbone, binary):
    model = _net(backbone, 0.5 if backbone == "small" else 0.125)
    frames, labels = _samples(binary)
    nb = run_neurobench(model, frames, labels, batch_size=3)  # uneven last batch: 3 + 3 + 1
    g, mac, fold = _profiles(model, frames, labels)
    tm = mac.totals()
    so = nb["SynapticOperations"]
    identity = [s for s in mac.synaptic if s.op == "Identity"]
    assert bool(identity) == (backbone == "resnet18")
    id_ops = sum(s.ops for s in identity) / mac.samples
    id_dense = sum(s.dense_per_step for s in identity) * mac.timesteps
    assert nb["ActivationSparsity"] == pytest.approx(tm["activation_sparsity"], rel=1e-12)
    assert so["Dense"] + id_dense == tm["synaptic_operations"]["Dense"]
    assert so["Effective_MACs"] == pytest.approx(tm["synaptic_operations"]["Effective_MACs"], rel=1e-12)
    assert so["Effective_ACs"] + id_ops == pytest.approx(tm["synaptic_operations"]["Effective_ACs"], rel=1e-12)
    assert nb["ClassificationAccuracy"] == pytest.approx(mac.accuracy, rel=1e-6)  # float32 per-batch means
    # the first layer: MACs on event counts, ACs on binary frames, in both
    first = mac.synaptic[0]
    assert first.counted_as == ("AC" if binary else "MAC")
    if not binary:
        assert so["Effective_MACs"] >= first.ops / mac.samples > 0
    # static metrics against an independent count of the wrapped modules
    net = EventHeadNet(model)
    assert nb["ParameterCount"] == sum(p.numel() for p in net.parameters())
    assert nb["Footprint"] == sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    assert nb["ConnectionSparsity"] == 0.0
    nbf = run_neurobench(model, frames, labels, batch_size=3, batchnorm_folded=True)
    rows = {r.metric: r for r in compare(nb, mac, fold, g, model, nbf)}
    for name in ("ActivationSparsity", "SynapticOperations.Dense", "SynapticOperations.Effective_MACs",
                 "SynapticOperations.Effective_ACs", "ClassificationAccuracy"):
        assert rows[name].equal is True, rows[name]
        assert rows[f"{name} [BN folded]"].equal is True, rows[f"{name} [BN folded]"]
    assert rows["ParameterCount"].tmkt == deploy_parameters(g) == nbf["ParameterCount"] < nb["ParameterCount"]
    assert set(NOT_MEASURED) <= set(rows) and rows["MembraneUpdates"].neurobench is None
    # fold mode is another definition, reported with both figures
    f = fold.totals()["synaptic_operations"]
    assert f"{f['Effective_ACs']:.6g} ACs" in rows["SynapticOperations (tmkt fold) ACs + MACs"].note


def test_fold_batchnorm_keeps_the_network():
    model = _net("resnet18", 0.125)
    x = torch.from_numpy(_samples(False, n=2)[0]).transpose(0, 1).contiguous()
    with torch.no_grad():
        ref = model(x)["logits"]
        got = fold_batchnorm(model)(x)["logits"]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fold_batchnorm(model).modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy: the model is untouched


def test_compare_counts_the_spikes_a_trained_network_moves():
    """The trained network firing k spikes more than the deploy graph: the rows say so, with k."""
    model = _net("small")
    frames, labels = _samples(False)
    nb = run_neurobench(model, frames, labels)
    g, mac, fold = _profiles(model, frames, labels)
    total = sum(n.neurons for n in mac.neuron) * mac.timesteps * mac.samples
    moved = dict(nb, ActivationSparsity=nb["ActivationSparsity"] - 3 / total)  # as if 3 more spikes
    rows = {r.metric: r for r in compare(moved, mac, fold, g, model, nb)}
    assert rows["ActivationSparsity"].equal is False and "+3 spikes" in rows["ActivationSparsity"].note
    assert rows["ActivationSparsity [BN folded]"].equal is True


def test_neurobench_really_cannot_see_spikingjelly_membranes():
    """Why MembraneUpdates is listed as not measured: NeuroBench's own metric reports 0 here."""
    from neurobench.benchmarks import Benchmark
    from neurobench.metrics.workload import MembraneUpdates
    from neurobench.models import TorchModel
    from spikingjelly.activation_based.neuron import BaseNode
    from torch.utils.data import DataLoader, TensorDataset

    model = _net("small")
    frames, labels = _samples(False, n=2)
    wrapped = TorchModel(EventHeadNet(model))
    wrapped.add_activation_module(BaseNode)
    data = DataLoader(TensorDataset(torch.from_numpy(frames), torch.from_numpy(labels)), batch_size=2)
    res = Benchmark(wrapped, data, [], [], [[], [MembraneUpdates]]).run(quiet=True)
    wrapped.cleanup_hooks()
    assert res["MembraneUpdates"] == 0


def test_cli_profile_neurobench(tmp_path):
    from tmkt.checkpoint import save_run
    from tmkt.cli import app

    model = _net("small")
    cfg = {
        "data": {"name": "digits", "class_names": [str(i) for i in range(4)], "sensor_size": [20, 20, 2],
                 "input_size": list(SIZE), "timesteps": 4,
                 "binning": {"by": "time", "binary": False, "shift_to_origin": False}},
        "method": {"name": "event-only"},
    }
    run = save_run(tmp_path / "run", model, cfg)
    frames, labels = _samples(False, n=5)
    np.savez(tmp_path / "s.npz", frames=frames, labels=labels)
    out = tmp_path / "p.json"
    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["profile", str(run), "--frames", str(tmp_path / "s.npz"), "--batch-size", "2", "--neurobench", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "NeuroBench" in res.output and "disagree" not in res.output
    doc = json.loads(out.read_text())
    nb = doc["neurobench"]
    assert nb["version"] == "2.3.0"
    assert nb["results"]["SynapticOperations"]["Dense"] == doc["totals"]["synaptic_operations"]["Dense"]
    assert [r["equal"] for r in nb["comparison"] if r["metric"].endswith("[BN folded]")] == [True] * 5
    assert nb["results_batchnorm_folded"]["ParameterCount"] < nb["results"]["ParameterCount"]
    assert nb["tmkt_mac_totals"]["synaptic_operations"]["Effective_MACs"] == pytest.approx(
        nb["results"]["SynapticOperations"]["Effective_MACs"])
