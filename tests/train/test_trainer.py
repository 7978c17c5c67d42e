"""Trainer: schedule, config loading, evaluation numbers, train -> resume equality."""

import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tmkt.train import resume, setup, step, trainer
from tmkt.train.config import PRESETS, ConfigError, TrainConfig, build_config, config_from_dict
from tmkt.train.evaluate import evaluate

# Tiny digits: 16x16 emulated sensor at 10 ms resolution (cheap to emulate), T=3, 30% of the
# event training set (162 samples), batch 8 -> 21 steps per epoch: enough steps for BatchNorm's
# running statistics to settle, so the evaluated network is well above chance after 2 epochs.
DIGITS_OPTIONS = {"image_size": 16, "time_resolution_us": 10000}


def tiny_config(out, cache, **kw) -> TrainConfig:
    base = dict(
        dataset="digits", timesteps=3, input_size=(16, 16), event_fraction=0.3, data_options=DIGITS_OPTIONS,
        cache_dir=str(cache), epochs=2, batch_size=8, lr=5e-3, warmup_epochs=0.5, device="cpu", out=str(out),
        eval_batch_size=64,
    )
    base.update(kw)
    return config_from_dict(base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One emulation per session, shared by the train test files (same base temp folder).
    return tmp_path_factory.getbasetemp() / "digits-cache"


def quiet():
    from rich.console import Console

    return Console(quiet=True)


# ------------------------------------------------------------------ schedule


def test_lr_schedule_warmup_then_cosine():
    total, warm, peak, floor = 100, 10, 1e-3, 1e-5
    lrs = [step.lr_at(s, total, warm, peak, floor) for s in range(total)]
    assert lrs[:10] == pytest.approx([peak * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(peak)
    # cosine half-way through the decay: floor + (peak - floor) / 2
    assert step.lr_at(55, total, warm, peak, floor) == pytest.approx(floor + (peak - floor) / 2)
    assert lrs[-1] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert step.lr_at(0, 10, 0, peak, floor) == pytest.approx(peak)


# ------------------------------------------------------------------ config


def test_presets_fill_unset_fields_and_paper_lr_rule():
    cfg = TrainConfig(dataset="ncaltech101").resolved()
    assert (cfg.backbone, cfg.timesteps, cfg.input_size, cfg.epochs, cfg.batch_size) == ("vgg", 10, (48, 48), 300, 120)
    assert cfg.lr == pytest.approx(5e-3 * 120 / 1024)
    assert TrainConfig(dataset="ncaltech101", batch_size=64).resolved().lr == pytest.approx(5e-3 * 64 / 1024)
    digits = TrainConfig().resolved()
    assert digits.epochs == PRESETS["digits"]["epochs"] and digits.eval_batch_size == 2 * digits.batch_size
    assert TrainConfig(epochs=3).resolved().epochs == 3


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 4\nlr: 0.001\nmethod:\n  name: ekt\n  align_weight: 0.25\nneuron: {tau: 3.0}\ninput_size: 24\n")
    cfg = build_config(path, {"epochs": 7, "method": "tmkt", "seed": None})
    assert cfg.epochs == 7  # flag wins
    assert cfg.lr == 0.001 and cfg.input_size == (24, 24) and cfg.neuron.tau == 3.0
    assert cfg.method.name == "tmkt" and cfg.method.align_weight == 0.25  # name from the flag, weight from YAML
    assert config_from_dict(cfg.to_dict()) == cfg  # JSON round trip


@pytest.mark.parametrize(
    "text, key",
    [
        ("epoch: 3\n", "epoch"),
        ("neuron: {taux: 2.0}\n", "taux"),
        ("method: {nme: tmkt}\n", "nme"),
        ("epochs: three\n", "epochs"),
        ("backbone: alexnet\n", "backbone"),
        ("amp: 1\n", "amp"),
    ],
)
def test_bad_yaml_key_is_named(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        build_config(path)


# ------------------------------------------------------------------ evaluation


class _FixedLogits(nn.Module):
    """Logits per step read off the input: class = round(x[t, b, 0, 0, 0]), one-hot * 1."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, head="event"):
        cls = x[:, :, 0, 0, 0].round().long()
        return {"logits": torch.nn.functional.one_hot(cls, self.k).float()}


def test_evaluate_counts_against_hand_made_predictions():
    # 3 classes; sample b predicts (majority over T of) the class written in its frames.
    preds = [0, 1, 2, 2, 1, 0, 0]
    labels = [0, 1, 2, 1, 1, 2, 0]
    data = []
    for p, y in zip(preds, labels):
        x = torch.zeros(4, 2, 2, 2)
        x[:, 0, 0, 0] = torch.tensor([p, p, p, (p + 1) % 3], dtype=torch.float32)  # 3 of 4 steps vote p
        data.append((x, y))
    res = evaluate(_FixedLogits(3), data, batch_size=3, class_names=["a", "b", "c"])
    assert res["correct"] == 5 and res["total"] == 7 and res["accuracy"] == 5 / 7
    assert res["per_class"]["a"] == {"accuracy": 1.0, "correct": 2, "total": 2}
    assert res["per_class"]["b"] == {"accuracy": 2 / 3, "correct": 2, "total": 3}
    assert res["per_class"]["c"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert res["confusion"] == [[2, 0, 0], [0, 2, 1], [1, 0, 1]]


# ------------------------------------------------------------------ training


def test_train_writes_run_and_reports_test_accuracy(tmp_path, cache):
    from tmkt.checkpoint import load_run
    from tmkt.data.registry import build_data

    res = trainer.train(tiny_config(tmp_path / "run", cache), console=quiet())
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"train_loss", "train_acc", "val_acc", "lr", "seconds"} <= set(r)
        assert math.isfinite(r["train_loss"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["metrics"]["test_accuracy"] == res.metrics["test_accuracy"]
    assert cfg["metrics"]["best_val_accuracy"] == max(r["val_acc"] for r in rows)
    assert cfg["train"]["data_options"] == DIGITS_OPTIONS and cfg["method"]["name"] == "ekt"

    # Independent count: the loaded best checkpoint, its predictions counted by hand.
    loaded = load_run(run)
    bundle = build_data("digits", timesteps=3, input_size=(16, 16), cache_dir=str(cache), options=DIGITS_OPTIONS)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(bundle.test), 64):
            items = [bundle.test[i] for i in range(start, min(start + 64, len(bundle.test)))]
            x = torch.stack([e for e, _ in items]).transpose(0, 1)
            pred = loaded.model(x)["logits"].mean(0).argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in items])).sum())
    assert correct / len(bundle.test) == res.metrics["test_accuracy"]
    assert res.metrics["test_accuracy"] > 0.3  # learned something (chance is 0.1)
    assert res.metrics["test_total"] == len(bundle.test)


class _InterruptAt:
    """Training set wrapper that sends this process SIGINT while loading item number `n`."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.n:
            signal.raise_signal(signal.SIGINT)
        return self.inner[i]


def test_interrupt_then_resume_equals_uninterrupted(tmp_path, cache, monkeypatch):
    import tmkt.data.registry as registry

    straight = trainer.train(tiny_config(tmp_path / "a", cache, method={"name": "tmkt"}), console=quiet())

    real_build = registry.build_data
    n_train = []

    def build_interrupting(*args, **kw):
        bundle = real_build(*args, **kw)
        n_train.append(len(bundle.train))
        bundle.train = _InterruptAt(bundle.train, len(bundle.train) + 8 + 3)  # in the 2nd step of epoch 2
        return bundle

    monkeypatch.setattr(registry, "build_data", build_interrupting)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(trainer.TrainingInterrupted) as info:
        trainer.train(tiny_config(tmp_path / "b", cache, method={"name": "tmkt"}), console=quiet())
    assert (info.value.epoch, info.value.step, info.value.exit_code) == (1, 2, 130)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    _, state = resume.load_resume_state(tmp_path / "b")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, math.ceil(n_train[0] / 8) + 2)

    monkeypatch.setattr(registry, "build_data", real_build)
    cfg = setup.resume_config(tmp_path / "b")
    resumed = trainer.train(cfg, console=quiet(), resume=tmp_path / "b")

    for name in ("last.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    ra, rb = (load_file(str(tmp_path / d / "resume.safetensors")) for d in ("a", "b"))
    for k in ra:
        if k.startswith(("optim.", "method.")):
            assert torch.equal(ra[k], rb[k]), k
    rows_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    assert resumed.metrics["test_accuracy"] == straight.metrics["test_accuracy"]


def test_resume_refuses_changed_settings(tmp_path, cache):
    trainer.train(tiny_config(tmp_path / "r", cache, epochs=1), console=quiet())
    with pytest.raises(trainer.TrainingError, match="lr"):
        setup.resume_config(tmp_path / "r", {"lr": 1.0})
    assert setup.resume_config(tmp_path / "r", {"num_workers": 0}).epochs == 1


def test_event_only_method_trains_without_static_requirement(tmp_path, cache):
    res = trainer.train(tiny_config(tmp_path / "d", cache, method={"name": "dvs"}), console=quiet())
    assert res.metrics["test_accuracy"] > 0.3  # chance is 0.1
    assert json.loads((tmp_path / "d" / "config.json").read_text())["method"]["name"] == "dvs"


def test_fresh_run_refuses_a_folder_holding_a_run(tmp_path, cache):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text('{"keep": "me"}')
    with pytest.raises(trainer.TrainingError, match="already holds a run"):
        trainer.train(tiny_config(run, cache), console=quiet())
    assert (run / "config.json").read_text() == '{"keep": "me"}'


def test_compile_trains_the_same_weights(tmp_path, cache, monkeypatch):
    """`--compile` wires the compiled step core into training: with AOTAutograd and no code
    generation (aot_eager, fast on a CPU), a run ends with the eager run's weights bit for bit."""
    import functools

    import torch._dynamo

    plain = trainer.train(tiny_config(tmp_path / "e", cache, epochs=1), console=quiet())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = trainer.train(tiny_config(tmp_path / "c", cache, epochs=1, compile=True), console=quiet())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step did run compiled
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("e", "c"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert compiled.metrics["test_accuracy"] == plain.metrics["test_accuracy"]


def test_loader_workers_default_by_device(monkeypatch):
    import os

    from tmkt.train.distributed import DistInfo

    one = DistInfo()
    assert setup.loader_workers(3, torch.device("cuda"), one) == 3  # asked for: kept
    assert setup.loader_workers(0, torch.device("cuda"), one) == 0
    assert setup.loader_workers(None, torch.device("cpu"), one) == 0  # CPU: in-process
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert setup.loader_workers(None, torch.device("cuda"), one) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert setup.loader_workers(None, torch.device("cuda"), one) == 1  # one core left to the main process
    assert config_from_dict({"num_workers": None}).num_workers is None
    with pytest.raises(ConfigError, match="num_workers"):
        config_from_dict({"num_workers": -1})
