"""`tmkt train` has a flag for every TrainConfig field: a field added to the config without one
fails here (eval_batch_size once had none)."""

import dataclasses

import typer

from tmkt.cli import app
from tmkt.train.config import TrainConfig

# Fields whose flag is not `--<field-name>`: the nested dataclasses and the repeatable option.
FLAG_OF = {"data_options": ["--option"], "neuron": ["--tau", "--v-threshold"], "method": ["--method"]}


def train_flags() -> set[str]:
    command = typer.main.get_command(app).commands["train"]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def test_every_config_field_has_a_flag():
    flags = train_flags()
    missing = [
        f.name for f in dataclasses.fields(TrainConfig)
        if not all(flag in flags for flag in FLAG_OF.get(f.name, ["--" + f.name.replace("_", "-")]))
    ]
    assert not missing, f"TrainConfig fields without a `tmkt train` flag: {missing}"


def test_eval_batch_size_flag_reaches_the_config(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import tmkt.train.trainer as trainer

    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg
        raise trainer.TrainingError("stop here")

    monkeypatch.setattr(trainer, "train", fake_train)
    res = CliRunner().invoke(app, ["train", "--eval-batch-size", "7", "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "stop here" in res.output
    assert seen["cfg"].eval_batch_size == 7
