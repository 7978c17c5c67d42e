"""The resume state of a run: `resume.safetensors`, one atomic file holding model, optimizer and
method tensors, the best weights so far and every RNG state as tensors, and epoch, step, best
metric and settings as JSON in the file's metadata (no pickle), so model and optimizer never
disagree after a crash.

RNG states are saved at step boundaries, from every rank, so a resumed run takes the same steps
as an uninterrupted one (see `tmkt.train.trainer`).

Checked on load, never filled in: the digests of the file's tensors (`tmkt_sha256`) and of its
JSON state (`state_sha256`), the list of its tensor names (`state.tensor_names`), every JSON
field's type and range, and, against the rebuilt network, method and optimizer, every tensor's
presence, dtype, shape and finiteness.
Files written before the digest and the name list existed still load, with the other checks.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmkt.checkpoint import CheckpointError, check_finite, check_tensors, read_weights, save_weights

RESUME_NAME = "resume.safetensors"
RESUME_FORMAT = "tmkt-resume/1"
# Settings that may change when a run is resumed (where and how fast, not what is computed).
RESUME_MUTABLE = ("device", "num_workers", "threads", "eval_batch_size", "cache_dir", "data_root", "static_root",
                  "compile")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict as (tensors keyed `optim.<param>.<name>`, JSON-ready rest)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, rest in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(rest)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_resume_state(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """One atomic safetensors file: tensors + JSON `state` (with the list of tensor names) in its
    metadata (no pickle), and the digest of its tensors."""
    text = json.dumps({**state, "tensor_names": sorted(tensors)})
    save_weights(path, tensors, metadata={"format": RESUME_FORMAT, "state": text,
                                          "state_sha256": hashlib.sha256(text.encode()).hexdigest()})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_state(path: Path, state: dict[str, Any]) -> None:
    """Types and ranges of the JSON fields; a bad one raises CheckpointError naming it."""

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: field 'state.{key}' {why}, got {state.get(key)!r}"[:300])

    for key in ("epoch", "step_in_epoch", "global_step", "metrics_lines"):
        if not _is_int(state.get(key, 0)) or state.get(key, 0) < 0:
            raise bad(key, "must be a non-negative integer")
    if not _is_int(state["world_size"]) or state["world_size"] < 1:
        raise bad("world_size", "must be a positive integer")
    if not isinstance(state["config"], dict):
        raise bad("config", "must be a mapping")
    best = state["best"]
    if not isinstance(best, dict) or set(best) != {"val_accuracy", "epoch"}:
        raise bad("best", "must be {val_accuracy, epoch}")
    if not (best["epoch"] is None or _is_int(best["epoch"]) and 1 <= best["epoch"] <= state["epoch"]):
        raise bad("best", f"epoch must be null or in 1..{state['epoch']} (state.epoch)")
    if (best["epoch"] is None) != (best["val_accuracy"] is None) or not (
        best["val_accuracy"] is None or _is_number(best["val_accuracy"])
    ):
        raise bad("best", "val_accuracy must be a number exactly when epoch is set")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars"), dict):
        raise bad("optimizer", "must hold param_groups (a list) and scalars (a mapping)")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]):
        raise bad("optimizer", "param_groups must be mappings with a params list")
    if not all(isinstance(v, dict) and str(k).isdigit() for k, v in opt["scalars"].items()):
        raise bad("optimizer", "scalars must map parameter indices to mappings")
    partial = state.get("partial_sums", {})
    if not isinstance(partial, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in partial.items()):
        raise bad("partial_sums", "must map names to numbers")
    rng = state["rng"]
    numpy_ok = isinstance(rng, dict) and isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 4 and \
        isinstance(rng["numpy"][0], str) and all(_is_number(v) for v in rng["numpy"][1:])
    python_ok = isinstance(rng, dict) and isinstance(rng.get("python"), list) and len(rng["python"]) == 3 and \
        _is_int(rng["python"][0]) and isinstance(rng["python"][1], list) and all(_is_int(v) for v in rng["python"][1])
    if not (numpy_ok and python_ok):
        raise bad("rng", "must hold the numpy and python generator states")
    names = state.get("tensor_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise bad("tensor_names", "must be a list of strings")


def load_resume_state(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read `resume.safetensors` of a run directory; errors name the file and the field.
    Checks the file (digest, every listed tensor present and finite) and the JSON fields; the
    tensors are checked against the network in `restore_training_state`."""
    path = Path(run_dir) / RESUME_NAME
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory")
    if not path.exists():
        raise CheckpointError(f"{path}: missing (the run saved no resume state; was it started by tmkt train?)")
    tensors, meta = read_weights(path)
    if meta.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: field 'format' must be {RESUME_FORMAT!r}, got {meta.get('format')!r}"[:300])
    try:
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: field 'state' missing or not JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: field 'state' must be a JSON object")
    for key in ("config", "epoch", "step_in_epoch", "global_step", "best", "optimizer", "world_size", "rng"):
        if key not in state:
            raise CheckpointError(f"{path}: missing field 'state.{key}'")
    _check_state(path, state)
    if "state_sha256" in meta and hashlib.sha256(meta["state"].encode()).hexdigest() != meta["state_sha256"]:
        raise CheckpointError(f"{path}: field 'state' does not match its state_sha256 (damaged or edited file)")
    names = state.get("tensor_names")
    if names is not None:  # written with the name list: the digest must be there too
        if "tmkt_sha256" not in meta:
            raise CheckpointError(f"{path}: field 'tmkt_sha256' missing from the file's metadata")
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        if missing or extra:
            raise CheckpointError(f"{path}: tensors differ from state.tensor_names (missing {missing[:5]}, unexpected {extra[:5]})")
    return tensors, state


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's method-generator and torch RNG states as uint8 tensors (to gather over ranks)."""
    return {"method": _rng_tensor(generator.get_state()), "torch": _rng_tensor(torch.get_rng_state())}


def resume_tensors(model_state: dict[str, torch.Tensor], method: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   rng: dict[str, list[torch.Tensor]], best_state: dict[str, torch.Tensor] | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of the resume file (model, method, optimizer, per-rank RNGs, numpy's RNG and, once
    a validation has run, the best weights as `best.*`) and the JSON-ready rest:
    (tensors, {"optimizer", "rng"})."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
    tensors.update({f"method.{k}": v for k, v in method.state_dict().items()})
    tensors.update(opt_tensors)
    tensors.update({f"rng.method.{r}": t for r, t in enumerate(rng["method"])})
    tensors.update({f"rng.torch.{r}": t for r, t in enumerate(rng["torch"])})
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    rng_state = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "python": _py_rng()}
    return tensors, {"optimizer": opt_meta, "rng": rng_state}


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


_TRANSIENT = (".v", ".v_seq")  # spikingjelly neuron memories: their shape follows the last batch


def check_resume_tensors(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], model_state: dict[str, torch.Tensor],
                         method: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every tensor of the resume file against the rebuilt network, method and optimizer:
    present, of their dtype and shape, finite; nothing missing, nothing extra."""
    check_tensors(path, _section(tensors, "model."), model_state, prefix="model.")
    best = _section(tensors, "best.")
    if best:
        check_tensors(path, best, model_state, prefix="best.")
    want = {k: v for k, v in method.state_dict().items()}
    got = _section(tensors, "method.")
    if set(got) != set(want):
        raise CheckpointError(f"{path}: method tensors differ from the method's (missing "
                              f"{sorted(set(want) - set(got))[:5]}, unexpected {sorted(set(got) - set(want))[:5]})")
    for k, v in got.items():
        if v.dtype != want[k].dtype or not k.endswith(_TRANSIENT) and tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{path}: tensor 'method.{k}' is {v.dtype} {tuple(v.shape)}, the method expects "
                                  f"{want[k].dtype} {tuple(want[k].shape)}")
    check_finite(path, {f"method.{k}": v for k, v in got.items()})
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = state["optimizer"]["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups)
    ):
        raise CheckpointError(f"{path}: field 'state.optimizer.param_groups' does not match the network's parameters")
    names: dict[int, set[str]] = {}
    for key, v in _section(tensors, "optim.").items():
        pid_text, _, name = key.partition(".")
        if not pid_text.isdigit() or int(pid_text) >= len(params) or not name:
            raise CheckpointError(f"{path}: tensor 'optim.{key}' names no parameter of the network")
        p = params[int(pid_text)]
        if v.dim() and (tuple(v.shape) != tuple(p.shape) or v.dtype != p.dtype):
            raise CheckpointError(f"{path}: tensor 'optim.{key}' is {v.dtype} {tuple(v.shape)}, its parameter "
                                  f"{p.dtype} {tuple(p.shape)}")
        names.setdefault(int(pid_text), set()).add(name)
    for pid, rest in state["optimizer"]["scalars"].items():
        if int(pid) >= len(params):
            raise CheckpointError(f"{path}: field 'state.optimizer.scalars.{pid}' names no parameter of the network")
        names.setdefault(int(pid), set()).update(rest)
    kinds = {frozenset(v) for v in names.values()}
    if len(kinds) > 1:  # every parameter with optimizer state has the same entries (Adam: step, exp_avg, exp_avg_sq)
        full = set().union(*kinds)
        pid = next(p for p, v in names.items() if v != full)
        raise CheckpointError(f"{path}: optimizer state of parameter {pid} lacks {sorted(full - names[pid])}")
    check_finite(path, {f"optim.{k}": v for k, v in _section(tensors, "optim.").items()})
    for r in range(state["world_size"]):
        for kind, like in (("method", torch.Generator().get_state()), ("torch", torch.get_rng_state())):
            t = tensors.get(f"rng.{kind}.{r}")
            if t is None or t.dtype != torch.uint8 or tuple(t.shape) != tuple(like.shape):
                raise CheckpointError(f"{path}: tensor 'rng.{kind}.{r}' missing or not a {kind} generator state")
    t = tensors.get("rng.numpy")
    if t is None or t.dtype != torch.int64 or tuple(t.shape) != (624,) or bool(((t < 0) | (t >= 2**32)).any()):
        raise CheckpointError(f"{path}: tensor 'rng.numpy' missing or not a numpy generator state")


def restore_training_state(tensors: dict[str, torch.Tensor], state: dict[str, Any], model: torch.nn.Module,
                           method: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                           path: Path | None = None) -> None:
    """Load model, method and optimizer tensors of a resume file, after `check_resume_tensors`."""
    from tmkt.checkpoint import model_state

    path = Path(path) if path is not None else Path(RESUME_NAME)
    check_resume_tensors(path, tensors, state, model_state(model), method, optimizer)
    try:
        model.load_state_dict(_section(tensors, "model."), strict=False)
        method.load_state_dict({k: v.to(device) for k, v in _section(tensors, "method.").items()})
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot restore the training state ({str(e)[:200]})") from None


def _py_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any], rank: int, generator: torch.Generator) -> None:
    """Put back the RNG states saved at a step boundary (mid-epoch resume)."""
    generator.set_state(tensors[f"rng.method.{rank}"].clone())
    torch.set_rng_state(tensors[f"rng.torch.{rank}"].clone())
    name, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))


def _rng_tensor(state: torch.Tensor) -> torch.Tensor:
    return state.detach().clone().to(torch.uint8).cpu()
