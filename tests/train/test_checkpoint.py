"""Run directories written by the trainer: broken fields give errors that name them."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tmkt.checkpoint import CheckpointError, load_run
from tmkt.train import resume, setup, trainer
from tmkt.train.config import config_from_dict

OPTIONS = {"image_size": 16, "time_resolution_us": 10000}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from rich.console import Console

    out = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = config_from_dict(
        dict(
            dataset="digits", timesteps=3, input_size=[16, 16], event_fraction=0.3, data_options=OPTIONS,
            cache_dir=str(tmp_path_factory.getbasetemp() / "digits-cache"), epochs=1, batch_size=8,
            device="cpu", out=str(out),
        )
    )
    trainer.train(cfg, console=Console(quiet=True))
    return out


def _copy(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["data"].pop("class_names"), "data.class_names"),
        (lambda c: c["data"].pop("timesteps"), "data.timesteps"),
        (lambda c: c["data"].update(timesteps="3"), "data.timesteps"),
        (lambda c: c["data"].update(class_names=[0, 1]), "data.class_names"),
        (lambda c: c.pop("method"), "method"),
        (lambda c: c["method"].pop("name"), "method.name"),
        (lambda c: c.update(format="tmkt-run/0"), "format"),
        (lambda c: c["model"].pop("backbone"), "model"),
        (lambda c: c["data"].update(class_names=["a", "b", "c"]), "num_classes"),
    ],
)
def test_broken_config_field_is_named(run_dir, tmp_path, edit, field):
    path = _copy(run_dir, tmp_path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
        load_run(path)


def test_weights_that_do_not_fit_are_named(run_dir, tmp_path):
    path = _copy(run_dir, tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["event_head.weight"] = torch.zeros(3, 3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="event_head.weight"):
        load_run(path)
    state.pop("event_head.weight")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_run(path)


def test_checkpoint_holds_everything_to_rebuild(run_dir):
    run = load_run(run_dir)
    assert run.timesteps == 3 and run.class_names == [str(d) for d in range(10)]
    assert run.config["train"]["data_options"] == OPTIONS and run.config["train"]["seed"] == 0
    assert run.config["data"]["input_size"] == [16, 16] and run.model.cfg.input_size == (16, 16)
    assert {"best_val_accuracy", "best_epoch", "test_accuracy", "test_total"} <= set(run.config["metrics"])
    last = load_run(run_dir, weights_name="last.safetensors")
    # one epoch: the best weights are the last ones
    for (k, a), (_, b) in zip(run.model.state_dict().items(), last.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_state_is_pickle_free_and_checked(run_dir, tmp_path):
    from safetensors import safe_open

    tensors, state = resume.load_resume_state(run_dir)
    from tmkt.data.registry import build_data

    cfg = setup.resume_config(run_dir)
    n_train = len(build_data("digits", timesteps=3, input_size=(16, 16), event_fraction=0.3, cache_dir=cfg.cache_dir, options=OPTIONS).train)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0 and state["global_step"] == -(-n_train // 8)
    assert any(k.startswith("optim.") for k in tensors) and "method.eta" in tensors
    path = _copy(run_dir, tmp_path)
    with safe_open(str(path / "resume.safetensors"), framework="pt") as f:
        meta = f.metadata()
    doc = json.loads(meta["state"])
    doc.pop("global_step")
    save_file(tensors, str(path / "resume.safetensors"), metadata={**meta, "state": json.dumps(doc)})
    with pytest.raises(CheckpointError, match=r"state\.global_step"):
        resume.load_resume_state(path)
    (path / "resume.safetensors").unlink()
    with pytest.raises(CheckpointError, match="resume.safetensors"):
        resume.load_resume_state(path)


def test_atomic_writes_get_the_umask_mode_not_owner_only(tmp_path):
    import os

    import torch

    from tmkt.checkpoint import atomic_write_json, save_weights

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "c.json", {"a": 1})
        save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("c.json", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
