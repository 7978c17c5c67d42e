"""Fuzz of the run-directory loaders (issue 15): hypothesis mutates config.json fields and the
bytes of model.safetensors and resume.safetensors of a tiny trained run. Every mutant either
loads as exactly the run that was written or raises CheckpointError (a TmktError); nothing else
escapes and nothing loads changed. Derandomized: the same mutants on every run."""

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes

from tmkt.checkpoint import CheckpointError, load_run, model_state
from tmkt.errors import TmktError
from tmkt.models import ModelConfig, build_model
from tmkt.train.method import build_method
from tmkt.train.resume import load_resume_state, restore_training_state
from tmkt.train.setup import resume_config
from tmkt.train.step import make_optimizer

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def reference(tiny_run, one_thread):
    run_dir = tiny_run[0]
    loaded = load_run(run_dir)
    tensors, state = load_resume_state(run_dir)
    return {
        "dir": run_dir,
        "config": json.loads((run_dir / "config.json").read_text()),
        "weights": {k: v.clone() for k, v in model_state(loaded.model).items()},
        "resume_tensors": tensors,
        "resume_state": state,
        "model_bytes": (run_dir / "model.safetensors").read_bytes(),
        "resume_bytes": (run_dir / "resume.safetensors").read_bytes(),
    }


def _paths(obj, prefix=()):
    """Every key path of a JSON document (containers and leaves)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63), st.floats(allow_nan=True),
    st.sampled_from(["", "x", "abc", "time", "count", "events", "frames", "small", "vgg", "1e9", "nan"]),
    st.sampled_from([10**9, 1e9, 0, -1, 1, 2, 3, 16, 1024, 1025, 65536, 2**31]),
    st.lists(st.integers(min_value=-3, max_value=70000), max_size=4), st.just({}), st.just({"by": "x"}),
)


def _set(doc, path, value, delete: bool):
    target = doc
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _scratch(reference) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tmkt-fuzz-"))
    for name in ("config.json", "model.safetensors", "resume.safetensors"):
        shutil.copy(reference["dir"] / name, folder / name)
    return folder


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_config_json_mutants_load_unchanged_or_raise_the_named_error(reference, data):
    paths = list(_paths(reference["config"]))
    path = data.draw(st.sampled_from(paths), label="field")
    delete = data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(HOSTILE, label="value")
    doc = json.loads(json.dumps(reference["config"]))
    _set(doc, path, value, delete)
    folder = _scratch(reference)
    try:
        (folder / "config.json").write_text(json.dumps(doc))
        try:
            run = load_run(folder)
        except CheckpointError as e:
            assert str(e).startswith(str(folder)), e
            return
        # what loads is the written network, built as its (valid) config says
        assert _same(model_state(run.model), reference["weights"])
        assert run.timesteps >= 1 and len(run.class_names) == run.model.cfg.num_classes
        assert math.isfinite(run.model.cfg.width) and run.model.cfg.input_size == tuple(run.data["input_size"])
    finally:
        shutil.rmtree(folder)


def _mutate_bytes(data, blob: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "zero"]), label="kind")
    b = bytearray(blob)
    if kind == "truncate":
        return bytes(b[: data.draw(st.integers(0, len(b) - 1), label="length")])
    if kind == "append":
        return bytes(b) + data.draw(st.binary(min_size=1, max_size=64), label="tail")
    header = 8 + int.from_bytes(blob[:8], "little")
    # half the mutants hit the header (names, dtypes, offsets, metadata), half the tensor data
    lo, hi = (0, header) if data.draw(st.booleans(), label="in header") else (header, len(b))
    for i in data.draw(st.lists(st.integers(lo, hi - 1), min_size=1, max_size=50), label="positions"):
        b[i] = 0 if kind == "zero" else b[i] ^ data.draw(st.integers(1, 255), label="xor")
    return bytes(b)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_model_safetensors_mutants_load_unchanged_or_raise_the_named_error(reference, data):
    folder = _scratch(reference)
    try:
        (folder / "model.safetensors").write_bytes(_mutate_bytes(data, reference["model_bytes"]))
        try:
            run = load_run(folder)
        except CheckpointError as e:
            assert str(folder / "model.safetensors") in str(e), e
            return
        assert _same(model_state(run.model), reference["weights"])
    finally:
        shutil.rmtree(folder)


def _restore(folder: Path):
    """What `tmkt train --resume` does with the file before training: read, check, restore."""
    tensors, state = load_resume_state(folder)
    cfg = resume_config(folder).resolved()
    mcfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text())["model"])
    model = build_model(mcfg)
    method = build_method(cfg.method, cfg.timesteps)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, torch.device("cpu"))
    restore_training_state(tensors, state, model, method, optimizer, torch.device("cpu"), folder / "resume.safetensors")
    return tensors, state, model


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_resume_state_mutants_restore_unchanged_or_raise_the_named_error(reference, data):
    folder = _scratch(reference)
    try:
        (folder / "resume.safetensors").write_bytes(_mutate_bytes(data, reference["resume_bytes"]))
        try:
            tensors, state, model = _restore(folder)
        except TmktError as e:
            assert isinstance(e, CheckpointError) and "resume.safetensors" in str(e), e
            return
        assert state == reference["resume_state"]
        assert _same(tensors, reference["resume_tensors"])
        assert _same(model_state(model), {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    finally:
        shutil.rmtree(folder)


def test_the_fuzzed_files_are_what_the_run_wrote(reference):
    """The fuzz starts from files that load: a mutant that 'loads unchanged' is a real outcome."""
    assert _same(load_bytes(reference["model_bytes"]), reference["weights"])
    assert _same(load_bytes(reference["resume_bytes"]), reference["resume_tensors"])
