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
    files   {weights file name: {sha256, bytes}} of every weights file written with it

Checks on load (errors are `CheckpointError`, one line naming the file and the field or tensor):
every field above is type- and range-checked (`tmkt.data.spec.DataSpec` limits T and the sample
size); every tensor must exist with the architecture's dtype and shape, and float tensors must
be finite; a weights file must match the sha256 recorded in `files` (runs written before the
record existed load without it) and the digest of its tensors stored in its own metadata
(`tmkt_sha256`, see `tensor_digest`). Nothing is ever filled in.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from tmkt import __version__
from tmkt.errors import TmktError
from tmkt.fileio import atomic_write_bytes
from tmkt.models import BACKBONES, ModelConfig, NeuronConfig, SpikingNet, build_model

FORMAT = "tmkt-run/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FILES_FIELD = "files"
DIGEST_KEY = "tmkt_sha256"  # safetensors metadata: digest of the file's tensors
REQUIRED_DATA_FIELDS = ("name", "class_names", "sensor_size", "input_size", "timesteps", "binning")
MAX_WIDTH = 64.0  # channel multiplier; a larger one is a damaged file, not a network to build
MAX_CLASSES = 100_000


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


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# ---------------------------------------------------------------- weights files


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: what a weights
    file means, independent of how safetensors lays it out."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Atomic safetensors write of a flat tensor dict, with the digest of its tensors in its
    metadata. Serialized in memory first, so a full disk is one `WriteError` naming `path`.
    Returns the record config.json keeps of the file: {"sha256": of its bytes, "bytes": size}."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    data = safetensors_bytes(tensors, metadata={**(metadata or {}), DIGEST_KEY: tensor_digest(tensors)})
    atomic_write_bytes(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _header(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CheckpointError(f"{path}: unreadable safetensors file ({len(data)} bytes, truncated)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CheckpointError(f"{path}: unreadable safetensors file (header of {n} bytes in a {len(data)}-byte file: truncated)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors file (header is not an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: unreadable safetensors file (metadata is not a string mapping)")
    return meta


def read_weights(path: str | Path, expected: dict[str, torch.Tensor] | None = None, *,
                 recorded: dict[str, Any] | None = None, require_digest: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and check a safetensors file: (tensors on the CPU, its metadata).

    `expected`: tensors of the architecture (`model_state(model)`): the file must hold exactly
    these names with these dtypes and shapes. Floating tensors must be finite. `recorded`: the
    entry of config.json's `files` (sha256 of the bytes). The digest in the file's metadata is
    checked when present (`require_digest`: it must be). Every failure is a `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    meta = _header(path, data)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(e)[:200]})") from None
    if expected is not None:
        check_tensors(path, tensors, expected)
    else:
        check_finite(path, tensors)
    if recorded and recorded.get("sha256"):
        actual = hashlib.sha256(data).hexdigest()
        if actual != recorded["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 {actual[:16]}... differs from {str(recorded['sha256'])[:16]}... recorded in "
                f"{CONFIG_NAME}: the file is damaged or comes from another save (a save cut short by a kill "
                "is repaired by tmkt train --resume)"
            )
    if DIGEST_KEY in meta:
        if tensor_digest(tensors) != meta[DIGEST_KEY]:
            raise CheckpointError(f"{path}: tensors do not match the digest stored in the file (damaged file)")
    elif require_digest:
        raise CheckpointError(f"{path}: field '{DIGEST_KEY}' missing from the file's metadata")
    del data
    return tensors, meta


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values")


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    """`tensors` must hold exactly `expected`'s names (after `prefix`), dtypes and shapes, finite."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {[prefix + k for k in missing[:5]]}, "
            f"unexpected {[prefix + k for k in unexpected[:5]]})"
        )
    for k, v in tensors.items():
        want = expected[k]
        if v.dtype != want.dtype:
            raise CheckpointError(f"{path}: tensor {prefix + k!r} is {v.dtype}, the model expects {want.dtype}")
        if tuple(v.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {prefix + k!r} has shape {tuple(v.shape)}, model expects {tuple(want.shape)}")
    check_finite(path, {prefix + k: v for k, v in tensors.items()})


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without spikingjelly's transient neuron memories."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".v", ".v_seq"))}


def save_run(run_dir: str | Path, model: SpikingNet, config: dict[str, Any], weights_name: str = WEIGHTS_NAME,
             state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `weights_name` (the model's weights, or `state` when given) and `config.json` (model
    section filled from the model) into `run_dir`. The sha256 of the weights file is recorded in
    config.json's `files`, and also in `config["files"]`, so that a caller that saves the same
    record again (the trainer) keeps the entries of every file it wrote."""
    run_dir = Path(run_dir)
    cfg = dict(config)
    cfg["format"] = FORMAT
    cfg["versions"] = versions()
    cfg["model"] = model.cfg.to_dict()
    cfg.pop(FILES_FIELD, None)
    _check_config(cfg, run_dir / CONFIG_NAME)
    entry = save_weights(run_dir / weights_name, model_state(model) if state is None else state,
                         metadata={"format": FORMAT})
    files = {**(config.get(FILES_FIELD) or {}), weights_name: entry}
    config[FILES_FIELD] = files
    cfg[FILES_FIELD] = files
    atomic_write_json(run_dir / CONFIG_NAME, cfg)
    return run_dir


# ---------------------------------------------------------------- config.json


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_model(m: dict[str, Any], where: Path) -> None:
    def bad(key: str, why: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{where}: field 'model.{key}' {why}, got {value!r}"[:300])

    if m.get("backbone") not in BACKBONES:
        raise bad("backbone", f"must be one of {BACKBONES}", m.get("backbone"))
    n = m.get("num_classes")
    if not _is_int(n) or not 2 <= n <= MAX_CLASSES:
        raise bad("num_classes", f"must be an integer in 2..{MAX_CLASSES}", n)
    c = m.get("in_channels")
    if not _is_int(c) or not 1 <= c <= 64:
        raise bad("in_channels", "must be an integer in 1..64", c)
    size = m.get("input_size")
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) and v >= 1 for v in size):
        raise bad("input_size", "must be [H, W] with positive integers", size)
    w = m.get("width")
    if not _is_number(w) or not 0 < w <= MAX_WIDTH:
        raise bad("width", f"must be a number in (0, {MAX_WIDTH:g}]", w)
    neuron = m.get("neuron")
    if not isinstance(neuron, dict):
        raise bad("neuron", "must be a mapping", neuron)
    for key, value in neuron.items():
        if key == "surrogate":
            continue
        if not _is_number(value):
            raise bad(f"neuron.{key}", "must be a finite number", value)
    try:
        NeuronConfig(**neuron)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: field 'model.neuron': {e}") from None


def _check_files(files: Any, where: Path) -> None:
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: field '{FILES_FIELD}' must be a mapping of file name to sha256, got {files!r}"[:300])
    for name, entry in files.items():
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise CheckpointError(f"{where}: field '{FILES_FIELD}.{name}.sha256' must be 64 hex digits, got {sha!r}"[:300])


def _check_config(cfg: dict[str, Any], where: Path) -> None:
    from tmkt.data.spec import DataSpec, SpecError

    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{where}: field 'format' must be {FORMAT!r}, got {cfg.get('format')!r}"[:300])
    for key in ("model", "data", "method"):
        if not isinstance(cfg.get(key), dict):
            raise CheckpointError(f"{where}: missing or malformed field {key!r}")
    try:
        DataSpec.from_dict(cfg["data"])
    except SpecError as e:
        raise CheckpointError(f"{where}: field 'data.{e.field}' {e.reason}") from None
    if not isinstance(cfg["method"].get("name"), str):
        raise CheckpointError(f"{where}: missing field 'method.name'")
    _check_model(cfg["model"], where)
    if cfg["model"]["input_size"] != list(cfg["data"]["input_size"]):
        raise CheckpointError(
            f"{where}: field 'model.input_size' {cfg['model']['input_size']} differs from 'data.input_size' "
            f"{cfg['data']['input_size']}"
        )
    for key in ("metrics", "train", "versions"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise CheckpointError(f"{where}: field {key!r} must be a mapping, got {cfg[key]!r}"[:300])
    versions_ = cfg.get("versions", {})
    if not isinstance(versions_.get("tmkt", ""), str):
        raise CheckpointError(f"{where}: field 'versions.tmkt' must be a string")
    for key, value in cfg.get("metrics", {}).items():
        if value is not None and not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CheckpointError(f"{where}: field 'metrics.{key}' must be a number or null, got {value!r}"[:300])
    train = cfg.get("train", {})
    for key, kinds in (("data_options", (dict,)), ("data_root", (str,)), ("cache_dir", (str,)), ("seed", (int,)),
                       ("event_fraction", (int, float))):
        if key in train and train[key] is not None and (not isinstance(train[key], kinds) or isinstance(train[key], bool)):
            raise CheckpointError(f"{where}: field 'train.{key}' has the wrong type: {train[key]!r}"[:300])
    if FILES_FIELD in cfg:
        _check_files(cfg[FILES_FIELD], where)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """Read and check `config.json` of a run directory."""
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).exists():
        raise CheckpointError(f"{run_dir}: no such file or folder")
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not path.exists():
        raise CheckpointError(f"{path}: missing (not a tmkt run directory?)")
    try:
        cfg = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except (OSError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: top level must be an object")
    _check_config(cfg, path)
    return cfg


def load_run(run_dir: str | Path, weights_name: str = WEIGHTS_NAME, map_location: str = "cpu") -> Run:
    """Rebuild the model of a run directory from its JSON and safetensors alone (eval mode).
    Every check of the module docstring runs; nothing is filled in."""
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
    recorded = cfg.get(FILES_FIELD, {}).get(weights_name)
    state, _ = read_weights(run_dir / weights_name, model_state(model), recorded=recorded)
    model.load_state_dict({k: v.to(map_location) for k, v in state.items()}, strict=False)
    model.eval()
    return Run(model=model, config=cfg, path=run_dir)
