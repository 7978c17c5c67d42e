"""The resume state of a run: `resume.safetensors`, one atomic file holding model, optimizer and
method tensors and every RNG state as tensors, and epoch, step, best metric and settings as JSON
in the file's metadata (no pickle), so model and optimizer never disagree after a crash.

RNG states are saved at step boundaries, from every rank, so a resumed run takes the same steps
as an uninterrupted one (see `tmkt.train.trainer`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, safe_open

from tmkt.checkpoint import CheckpointError, save_weights

RESUME_NAME = "resume.safetensors"
RESUME_FORMAT = "tmkt-resume/1"
# Settings that may change when a run is resumed (where and how fast, not what is computed).
RESUME_MUTABLE = ("device", "num_workers", "eval_batch_size", "cache_dir", "data_root", "static_root", "compile")


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
    """One atomic safetensors file: tensors + JSON `state` in its metadata (no pickle)."""
    save_weights(path, tensors, metadata={"format": RESUME_FORMAT, "state": json.dumps(state)})


def load_resume_state(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read `resume.safetensors` of a run directory; errors name the file and the field."""
    path = Path(run_dir) / RESUME_NAME
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory")
    if not path.exists():
        raise CheckpointError(f"{path}: missing (the run saved no resume state; was it started by tmkt train?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    if meta.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: field 'format' must be {RESUME_FORMAT!r}, got {meta.get('format')!r}")
    try:
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: field 'state' missing or not JSON ({e})") from None
    for key in ("config", "epoch", "step_in_epoch", "global_step", "best", "optimizer", "world_size", "rng"):
        if key not in state:
            raise CheckpointError(f"{path}: missing field 'state.{key}'")
    return tensors, state


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's method-generator and torch RNG states as uint8 tensors (to gather over ranks)."""
    return {"method": _rng_tensor(generator.get_state()), "torch": _rng_tensor(torch.get_rng_state())}


def resume_tensors(model_state: dict[str, torch.Tensor], method: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   rng: dict[str, list[torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of the resume file (model, method, optimizer, per-rank RNGs, numpy's RNG) and the
    JSON-ready rest: (tensors, {"optimizer", "rng"})."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"method.{k}": v for k, v in method.state_dict().items()})
    tensors.update(opt_tensors)
    tensors.update({f"rng.method.{r}": t for r, t in enumerate(rng["method"])})
    tensors.update({f"rng.torch.{r}": t for r, t in enumerate(rng["torch"])})
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    rng_state = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "python": _py_rng()}
    return tensors, {"optimizer": opt_meta, "rng": rng_state}


def restore_training_state(tensors: dict[str, torch.Tensor], state: dict[str, Any], model: torch.nn.Module,
                           method: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Load model, method and optimizer tensors of a resume file."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    method.load_state_dict({k[7:]: v.to(device) for k, v in tensors.items() if k.startswith("method.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))


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
