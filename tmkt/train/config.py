"""Trainer settings: one frozen dataclass, read from YAML and overridden by CLI flags.

Precedence is defaults < per-data-set preset < YAML file < CLI flags. The preset only fills the
fields left as ``None`` (``timesteps``, ``input_size``, ``backbone``, ``epochs``, ``batch_size``,
``warmup_epochs``, ``lr``): the built-in ``digits`` preset is sized to train in a few minutes on
two CPU cores; the real-set presets follow the paper / EKT (VGG-SNN, T=10, 48x48, 300 epochs,
batch 120, lr = 5e-3 * batch / 1024, 5 warm-up epochs).

YAML layout: the field names of ``TrainConfig`` at the top level, ``neuron:`` and ``method:``
as nested mappings (``method:`` may also be a bare method name). An unknown or mistyped key is an
error that names it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tmkt.errors import TmktError
from tmkt.models import BACKBONES, NeuronConfig
from tmkt.train.method import METHODS, MethodConfig


class ConfigError(TmktError, ValueError):
    """A setting that cannot be used; the message names the key."""


# The papers' setting (EKT code / TMKT paper): VGG-SNN, T=10, 48x48, 300 epochs, batch 120;
# lr unset, so the paper's rule 5e-3 * batch / 1024 applies.
_PAPER_VGG: dict[str, Any] = {
    "timesteps": 10,
    "input_size": (48, 48),
    "backbone": "vgg",
    "epochs": 300,
    "batch_size": 120,
    "warmup_epochs": 5.0,
}

# The built-in sets (digits, mnist), sized for `tmkt train` on an idle 2-core CPU: digits takes ~1
# minute including the first emulation of the data set (~4 s per epoch); mnist's 1,500 event
# training recordings make an epoch ~3x longer. lr above the paper's rule because 541 samples x
# 10 epochs give only 170 steps.
_BUILTIN_SMALL: dict[str, Any] = {
    "timesteps": 8,
    "input_size": (32, 32),
    "backbone": "small",
    "epochs": 10,
    "batch_size": 32,
    "warmup_epochs": 1.0,
    "lr": 5e-3,
}

# Per-data-set values for the fields left as None. `lr` None means the paper's 5e-3 * batch / 1024.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": _BUILTIN_SMALL,
    "mnist": _BUILTIN_SMALL,
    "ncaltech101": _PAPER_VGG,
    "cifar10dvs": _PAPER_VGG,
}
GENERIC_PRESET: dict[str, Any] = {
    "timesteps": 10,
    "input_size": None,  # the data set's own default
    "backbone": "vgg",
    "epochs": 100,
    "batch_size": 64,
    "warmup_epochs": 5.0,
}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (stored in the run's config.json as `train`).

    Data:
        dataset: data set name (`tmkt.data.registry.NAMES`).
        data_root: folder of the event recordings (real sets).
        static_root: folder of the static images (real sets; None: event-only methods only).
        event_fraction: share of the event training set kept, per class, in (0, 1].
        data_options: set-specific options passed to `build_data(options=...)`.
        cache_dir: frame cache (None: `~/.cache/tmkt`).
        timesteps: T, frames per sample (None: preset).
        input_size: (H, W) the network sees (None: preset, then the data set's default).
    Model:
        backbone: `small` | `vgg` | `resnet18` (None: preset).
        width: channel multiplier.
        neuron: LIF parameters.
    Method:
        method: `dvs` | `finetune` | `ekt` | `tmkt` and its loss weights.
    Optimisation (AdamW, linear warm-up then cosine to `min_lr`, stepped per iteration):
        epochs, batch_size (global, split over DDP ranks): None -> preset.
        lr: peak learning rate (None: preset, else 5e-3 * batch_size / 1024 as in the paper).
        weight_decay: AdamW decoupled weight decay.
        warmup_epochs: linear warm-up length in epochs (may be fractional; None: preset).
        min_lr: final learning rate of the cosine.
        seed: seeds data split, pairing, initialisation, shuffling and the method's draws.
    Run:
        out: run directory (None: `runs/<timestamp>-<method>`).
        device: `auto` (CUDA when available) | `cpu` | `cuda`.
        num_workers: DataLoader worker processes (None: 0 on CPU; on CUDA up to 4 per process,
            since loading a batch of 120 in the main process takes about as long as a GPU step).
        threads: torch's intra-op CPU threads for the run (None: leave the process's setting;
            `tmkt train` passes its policy, `tmkt.train.setup.default_cpu_threads`). Results are
            bitwise reproducible for one thread count; another count changes float rounding.
        amp: bfloat16 autocast on CUDA (ignored on CPU, which trains in float32).
        channels_last: channels-last memory format on CUDA.
        compile: `torch.compile` each step's forward passes and losses as one graph (any device;
            the first step compiles, which takes minutes; worth it for long GPU runs).
        eval_every: validate every this many epochs (and always after the last).
        eval_batch_size: batch size for validation / test (None: 2 * batch_size).
    """

    dataset: str = "digits"
    data_root: str | None = None
    static_root: str | None = None
    event_fraction: float = 1.0
    data_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    timesteps: int | None = None
    input_size: tuple[int, int] | None = None
    backbone: str | None = None
    width: float = 1.0
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_epochs: float | None = None
    min_lr: float = 1e-5
    seed: int = 0
    out: str | None = None
    device: str = "auto"
    num_workers: int | None = None
    threads: int | None = None
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_every: int = 1
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("event_fraction", 0 < self.event_fraction <= 1, "must be in (0, 1]"),
            ("timesteps", self.timesteps is None or self.timesteps >= 1, "must be >= 1"),
            ("backbone", self.backbone is None or self.backbone in BACKBONES, f"must be one of {BACKBONES}"),
            ("width", self.width > 0, "must be > 0"),
            ("epochs", self.epochs is None or self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr is None or self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_epochs", self.warmup_epochs is None or self.warmup_epochs >= 0, "must be >= 0"),
            ("min_lr", self.min_lr >= 0, "must be >= 0"),
            ("device", self.device in DEVICES, f"must be one of {DEVICES}"),
            ("num_workers", self.num_workers is None or self.num_workers >= 0, "must be >= 0"),
            ("threads", self.threads is None or 1 <= self.threads <= 1024, "must be in 1..1024"),
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size is None or self.eval_batch_size >= 1, "must be >= 1"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {getattr(self, key)!r}")
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 1):
            raise ConfigError(f"input_size must be (H, W) with positive sides, got {self.input_size!r}")

    def resolved(self) -> TrainConfig:
        """A copy with every `None` that a preset decides filled in (`input_size` may stay None)."""
        preset = PRESETS.get(self.dataset, GENERIC_PRESET)
        updates: dict[str, Any] = {}
        for key in ("timesteps", "input_size", "backbone", "epochs", "batch_size", "warmup_epochs"):
            if getattr(self, key) is None:
                updates[key] = preset.get(key, GENERIC_PRESET[key])
        batch = updates.get("batch_size", self.batch_size)
        if self.lr is None:
            updates["lr"] = preset.get("lr", 5e-3 * batch / 1024)
        if self.eval_batch_size is None:
            updates["eval_batch_size"] = 2 * batch
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the inverse of `config_from_dict`)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "neuron":
                v = dataclasses.asdict(v)
            elif f.name == "method":
                v = v.to_dict()
            elif f.name == "input_size" and v is not None:
                v = list(v)
            elif f.name == "data_options":
                v = dict(v)
            d[f.name] = v
        return d


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Check and convert one YAML / JSON value to the field's type; errors name the key."""
    kind = _FIELD_TYPES[key]
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{key} may not be null")
    try:
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError("expected true or false")
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError("expected an integer")
            return value
        if kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError("expected a number")
            return float(value)
        if key == "input_size":
            if isinstance(value, int) and not isinstance(value, bool):
                return (value, value)
            if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
                return (int(value[0]), int(value[1]))
            raise TypeError("expected [H, W] or one integer")
        if key == "data_options":
            if not isinstance(value, dict):
                raise TypeError("expected a mapping")
            return dict(value)
        if key == "neuron":
            if not isinstance(value, dict):
                raise TypeError("expected a mapping")
            known = {f.name for f in fields(NeuronConfig)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"unknown key neuron.{unknown[0]} (known: {', '.join(sorted(known))})")
            return NeuronConfig(**value)
        if key == "method":
            if isinstance(value, str):
                value = {"name": value}
            if not isinstance(value, dict):
                raise TypeError("expected a method name or a mapping")
            return MethodConfig.from_dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{key}: {e} (got {value!r})") from None
    raise ConfigError(f"{key}: unsupported field type {kind}")


def config_from_dict(d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """`base` (default: `TrainConfig()`) with the keys of `d` replaced; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"a training config must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (known: {', '.join(sorted(_FIELD_TYPES))})")
    base = base or TrainConfig()
    d = dict(d)
    # Nested sections merge onto the base, so `method: ekt` or `neuron: {tau: 3}` keep the rest.
    if isinstance(d.get("method"), str):
        d["method"] = {"name": d["method"]}
    if isinstance(d.get("method"), dict):
        d["method"] = {**base.method.to_dict(), **d["method"]}
    if isinstance(d.get("neuron"), dict):
        d["neuron"] = {**dataclasses.asdict(base.neuron), **d["neuron"]}
    values = {k: _coerce(k, v) for k, v in d.items()}
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML training config as a dict (checked later by `config_from_dict`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return data


def build_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < YAML file < `overrides` (CLI flags; `None` values are ignored)."""
    cfg = TrainConfig()
    if yaml_path is not None:
        try:
            cfg = config_from_dict(load_yaml(yaml_path), cfg)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(str(yaml_path)) else f"{yaml_path}: {msg}") from None
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    return config_from_dict(flags, cfg)


__all__ = ["METHODS", "PRESETS", "ConfigError", "TrainConfig", "build_config", "config_from_dict", "load_yaml"]
