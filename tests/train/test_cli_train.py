"""`tmkt train` / `tmkt eval` through the CLI."""

import json
import sys

from typer.testing import CliRunner

from tmkt.cli import app

TINY = [
    "--dataset", "digits", "-T", "3", "--input-size", "16", "--event-fraction", "0.3", "-o", "image_size=16",
    "-o", "time_resolution_us=10000", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
]


def test_help_reads():
    runner = CliRunner()
    for cmd, words in (("train", ["--resume", "--config", "--method", "--epochs"]), ("eval", ["--split", "--per-class", "--json"])):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0, res.output
        for w in words:
            assert w in res.output


def test_train_then_eval_reproduces_reported_accuracy(tmp_path, tmp_path_factory):
    runner = CliRunner()
    run = tmp_path / "run"
    cache = str(tmp_path_factory.getbasetemp() / "digits-cache")
    res = runner.invoke(app, ["train", *TINY, "--cache-dir", cache, "--out", str(run)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    reported = cfg["metrics"]["test_accuracy"]
    assert f"test accuracy: {reported:.4f}" in res.output and f"run directory: {run}" in res.output

    res = runner.invoke(app, ["eval", str(run), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["accuracy"] == reported and out["total"] == cfg["metrics"]["test_total"]
    assert "per_class" not in out

    res = runner.invoke(app, ["eval", str(run), "--json", "--split", "val", "--per-class", "--device", "cpu"])
    out = json.loads(res.output)
    assert out["accuracy"] == cfg["metrics"]["best_val_accuracy"]
    assert sum(c["correct"] for c in out["per_class"].values()) == out["correct"]
    assert sum(c["total"] for c in out["per_class"].values()) == out["total"]

    res = runner.invoke(app, ["eval", str(run), "--per-class", "--device", "cpu"])
    assert res.exit_code == 0 and "test accuracy:" in res.output and "class" in res.output

    # The deploy graph of the trained run equals its spikingjelly model spike for spike on test data.
    _deploy_graph_equals_trained_model(run, cache)

    # The Loihi exit of the same run: exported through the CLI, evaluated by `tmkt eval FILE.net`.
    # Its float model is this run on the same test split, so it must report the same accuracy.
    net = run / "model.net"
    res = runner.invoke(app, ["export", str(run), "--target", "lava", "--out", str(net), "--no-verify"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", str(net), "--json", "--cache-dir", cache])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["float_accuracy"] == reported
    assert out["samples"] == cfg["metrics"]["test_total"]
    assert 0.0 <= out["quantized_accuracy"] <= 1.0 and 0.0 <= out["agreement"] <= 1.0
    res = runner.invoke(app, ["eval", str(net), "--cache-dir", cache])
    assert res.exit_code == 0 and "bit-accurate simulator" in res.output


def test_bad_inputs_fail_cleanly(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    res = runner.invoke(app, ["train", "--config", str(bad)])
    assert res.exit_code == 1 and "epoch" in res.output and "Traceback" not in res.output

    res = runner.invoke(app, ["eval", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "nowhere: no such file or folder" in res.output

    res = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert res.exit_code == 1 and "resume.safetensors" in res.output

    res = runner.invoke(app, ["train", "--input-size", "big"])
    assert res.exit_code == 2 and "--input-size" in res.output


def test_netx_file_without_exporter_says_not_available(tmp_path, monkeypatch):
    net = tmp_path / "model.net"
    net.write_bytes(b"\x89HDF\r\n")
    monkeypatch.setitem(sys.modules, "tmkt.runtime.loihi_sim", None)  # as if the netx evaluation were absent
    res = CliRunner().invoke(app, ["eval", str(net)])
    assert res.exit_code == 1 and "not available" in res.output


def _deploy_graph_equals_trained_model(run, cache):
    import torch
    from spikingjelly.activation_based import neuron as sj_neuron

    from tmkt.checkpoint import load_run
    from tmkt.data.registry import build_data
    from tmkt.export.graph import lower_run, run_graph

    loaded = load_run(run)
    stored = loaded.config["train"]
    data = loaded.data
    bundle = build_data("digits", timesteps=loaded.timesteps, input_size=tuple(data["input_size"]),
                        seed=stored["seed"], cache_dir=cache, options=stored["data_options"])
    x = torch.stack([bundle.test[i][0] for i in range(16)], dim=1)  # [T, B, 2, H, W]
    lifs = [m for m in loaded.model.trunk.modules() if isinstance(m, sj_neuron.LIFNode)]
    got = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: got.append(out.detach().clone())) for m in lifs]
    with torch.no_grad():
        logits = loaded.model(x)["logits"]
    for h in hooks:
        h.remove()
    graph = lower_run(loaded)
    ref = run_graph(graph, x)
    assert len(got) == len(ref["spikes"]) and sum(float(s.sum()) for s in got) > 0
    for sj, name in zip(got, ref["spikes"]):
        assert torch.equal(sj.reshape(ref["spikes"][name].shape), ref["spikes"][name]), name
    torch.testing.assert_close(ref["step_logits"], logits, atol=1e-5, rtol=1e-5)


def test_usage_errors_are_messages(tmp_path):
    """Regressions: eval --device tpu and train --out FILE were raw tracebacks; an event .h5 given to
    eval is read as a netx export (the lava target writes model.netx.h5) and refused by name."""
    runner = CliRunner(env={"COLUMNS": "400"})
    res = runner.invoke(app, ["eval", str(tmp_path), "--device", "tpu"])
    assert res.exit_code == 2 and "--device" in res.output
    (tmp_path / "f.txt").write_text("x")
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "f.txt"), "--epochs", "1"])
    assert res.exit_code == 1 and "is a file" in res.output and "Traceback" not in res.output
    assert (tmp_path / "f.txt").read_text() == "x"
    import numpy as np

    from tmkt.data.events import EVENT_DTYPE, write_events

    write_events(tmp_path / "rec.h5", np.zeros(3, EVENT_DTYPE), (4, 4))
    res = runner.invoke(app, ["eval", str(tmp_path / "rec.h5")])
    assert res.exit_code == 1 and "not a tmkt netx export" in res.output
    assert res.output.count(str(tmp_path / "rec.h5")) == 1


def test_preset_paper_trains_the_papers_design(tmp_path, tmp_path_factory):
    """`--preset paper` stores the papers' method settings in the run; --method still picks the method."""
    from tmkt.train.method import METHOD_PRESETS

    runner = CliRunner()
    cache = str(tmp_path_factory.getbasetemp() / "digits-cache")
    run = tmp_path / "paper"
    res = runner.invoke(app, ["train", *TINY, "--epochs", "1", "--cache-dir", cache, "--out", str(run), "--preset", "paper"])
    assert res.exit_code == 0, res.output
    stored = json.loads((run / "config.json").read_text())["train"]["method"]
    assert {k: stored[k] for k in METHOD_PRESETS["paper"]} == METHOD_PRESETS["paper"]
    run = tmp_path / "paper-ekt"
    res = runner.invoke(app, ["train", *TINY, "--epochs", "1", "--cache-dir", cache, "--out", str(run),
                              "--preset", "paper", "--method", "ekt"])
    assert res.exit_code == 0, res.output
    stored = json.loads((run / "config.json").read_text())["train"]["method"]
    assert stored["name"] == "ekt" and stored["source_head"] == "mixed" and stored["bn_stats"] == "both"
    res = runner.invoke(app, ["train", *TINY, "--preset", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "paper" in res.output
