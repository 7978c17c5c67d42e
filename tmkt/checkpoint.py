"""Run directories: `model.safetensors` (+ `last.safetensors`) and `config.json`.

Loading never unpickles: weights come from safetensors, everything else from JSON. Writes are
atomic (temporary file in the same directory, then `os.replace`), so an interrupted run always
leaves the previous complete checkpoint.

config.json (format `tmkt-run/1`):
    format, versions {tmkt, torch, spikingjelly},
    model   ModelConfig.to_dict() (backbone, num_classes, in_channels, input_size, width, neuron{...})
    data    {name, class_names, sensor_size [W, H, 2], input_size [H, W], timesteps, binning{...}}
    method  {name, ...its settings}
    train   trainer settings (free-form, for the record)
    metrics {...} best / final numbers
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tmkt import __version__
from tmkt.errors import TmktError
from tmkt.fileio import atomic_path
from tmkt.models import ModelConfig, SpikingNet, build_model

FORMAT = "tmkt-run/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REQUIRED_DATA_FIELDS = ("name", "class_names", "sensor_size", "input_size", "timesteps", "binning")


class CheckpointError(TmktError, ValueError):
    """A run directory that cannot be loaded; the message names the file and the field."""


@dataclass
class Run:
    """A loaded run: the model (eval mode) and its metadata."""

    model: SpikingNet
    config: dict[str, Any]
    path: Path

    @property
    def model_config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def data(self) -> dict[str, Any]:
        return self.config["data"]

    @property
    def timesteps(self) -> int:
        return int(self.config["data"]["timesteps"])

    @property
    def class_names(self) -> list[str]:
        return list(self.config["data"]["class_names"])


def versions() -> dict[str, str]:
    import spikingjelly

    return {
        "tmkt": __version__,
        "torch": torch.__version__,
        "spikingjelly": getattr(spikingjelly, "__version__", "unknown"),
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write of a flat tensor dict."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without spikingjelly's transient neuron memories."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".v", ".v_seq"))}


def save_run(run_dir: str | Path, model: SpikingNet, config: dict[str, Any], weights_name: str = WEIGHTS_NAME) -> Path:
    """Write `weights_name` and `config.json` (model section filled from the model) into `run_dir`."""
    run_dir = Path(run_dir)
    cfg = dict(config)
    cfg["format"] = FORMAT
    cfg["versions"] = versions()
    cfg["model"] = model.cfg.to_dict()
    _check_config(cfg, run_dir / CONFIG_NAME)
    save_weights(run_dir / weights_name, model_state(model), metadata={"format": FORMAT})
    atomic_write_json(run_dir / CONFIG_NAME, cfg)
    return run_dir


def _check_config(cfg: dict[str, Any], where: Path) -> None:
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{where}: field 'format' must be {FORMAT!r}, got {cfg.get('format')!r}")
    for key in ("model", "data", "method"):
        if not isinstance(cfg.get(key), dict):
            raise CheckpointError(f"{where}: missing or malformed field {key!r}")
    for key in REQUIRED_DATA_FIELDS:
        if key not in cfg["data"]:
            raise CheckpointError(f"{where}: missing field 'data.{key}'")
    names = cfg["data"]["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: field 'data.class_names' must be a list of strings")
    if not isinstance(cfg["data"]["timesteps"], int) or cfg["data"]["timesteps"] < 1:
        raise CheckpointError(f"{where}: field 'data.timesteps' must be a positive integer")
    if "name" not in cfg["method"]:
        raise CheckpointError(f"{where}: missing field 'method.name'")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """Read and check `config.json` of a run directory."""
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not path.exists():
        raise CheckpointError(f"{path}: missing (not a tmkt run directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: top level must be an object")
    _check_config(cfg, path)
    return cfg


def load_run(run_dir: str | Path, weights_name: str = WEIGHTS_NAME, map_location: str = "cpu") -> Run:
    """Rebuild the model of a run directory from its JSON and safetensors alone (eval mode)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    try:
        mcfg = ModelConfig.from_dict(cfg["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{run_dir / CONFIG_NAME}: field 'model': {e}") from None
    n_classes = len(cfg["data"]["class_names"])
    if mcfg.num_classes != n_classes:
        raise CheckpointError(
            f"{run_dir / CONFIG_NAME}: model.num_classes={mcfg.num_classes} but data.class_names has {n_classes}"
        )
    model = build_model(mcfg)
    wpath = run_dir / weights_name
    if not wpath.exists():
        raise CheckpointError(f"{wpath}: missing weights file")
    try:
        state = load_file(str(wpath), device=map_location)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{wpath}: unreadable safetensors file ({e})") from None
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{wpath}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{wpath}: tensor {k!r} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
    model.eval()
    return Run(model=model, config=cfg, path=run_dir)
