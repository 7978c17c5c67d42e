"""Stage 1 of a training run: run directory, data, network, method loss, optimizer and the resume
state, gathered in one `TrainingRun` that the epoch and test stages (`tmkt.train.trainer`) carry on."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tmkt.checkpoint import CONFIG_NAME, FILES_FIELD, CheckpointError, model_state, read_config, read_weights, save_run
from tmkt.fileio import exclusive_lock
from tmkt.models import ModelConfig, build_model
from tmkt.train import distributed as dist_utils
from tmkt.train.config import TrainConfig, config_from_dict
from tmkt.train.errors import TrainingDataError, TrainingError
from tmkt.train.metrics import METRICS_NAME, metrics_record, tensorboard, truncate_metrics
from tmkt.train.resume import RESUME_MUTABLE, RESUME_NAME, load_resume_state, restore_training_state
from tmkt.train.step import Objective, make_optimizer

LAST_NAME = "last.safetensors"
BEST_NAME = "model.safetensors"
LOCK_NAME = ".tmkt.lock"  # held (flock) by the process that writes the run directory


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_cpu_threads() -> int:
    """`tmkt train`'s intra-op thread count when --threads is not given: OMP_NUM_THREADS when the
    user set it, else one per usable CPU.
    With the passive OpenMP wait policy the CLI sets (`OMP_WAIT_POLICY=PASSIVE`), threads that
    wait for a busy core sleep instead of spinning on it, which is what keeps an epoch beside
    another CPU-bound process near its one-thread time (figures: docs/robustness.md)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: processes sharing this machine
    return max(1, usable_cpus() // max(1, per_node))


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (None: unchanged), restored after."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_run_dir(method: str, root: str | Path = "runs") -> Path:
    """`runs/<YYYYmmdd-HHMMSS>-<method>`, with a numeric suffix if that already exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{stamp}-{method}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{method}-{n}"
    return path


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The stored settings of a run, with only `RESUME_MUTABLE` keys changeable by `overrides`."""
    _, state = load_resume_state(run_dir)
    try:
        cfg = config_from_dict(state["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{Path(run_dir) / RESUME_NAME}: field 'state.config': {e}") from None
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    fixed = sorted(k for k in changes if k not in RESUME_MUTABLE)
    if fixed:
        raise TrainingError(
            f"--resume continues the run with its own settings; {', '.join(fixed)} cannot change "
            f"(only {', '.join(RESUME_MUTABLE)} may)"
        )
    return config_from_dict(changes, cfg)


def loader_workers(requested: int | None, device: torch.device, info: dist_utils.DistInfo) -> int:
    """DataLoader workers: as requested, else 0 on CPU (in-process, the CPU is busy training) and
    on CUDA up to 4 per process, as many as the cores allow (a batch of 120 paired samples takes
    tens of ms to load and collate in the main process, about a GPU step)."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    per_process = (os.cpu_count() or 1) // max(1, torch.cuda.device_count() if info.enabled else 1)
    return max(0, min(4, per_process - 1))


@dataclass(eq=False)
class TrainingRun:
    """What set-up builds and every epoch carries on, for one training process."""

    cfg: TrainConfig
    device: torch.device
    info: dist_utils.DistInfo
    console: Any
    say: Callable[..., None]
    run_dir: Path
    bundle: Any  # tmkt.data.spec.DataBundle
    model: nn.Module
    method: nn.Module
    objective: nn.Module  # model + method, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    per_rank_batch: int
    steps_per_epoch: int
    workers: int
    generator: torch.Generator = field(default_factory=torch.Generator)
    record: dict[str, Any] = field(default_factory=dict)  # what config.json holds
    tb: Any = None  # TensorBoard writer (rank 0, when tensorboard imports)
    resumed: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # resume file: tensors, state
    start_epoch: int = 0
    start_step: int = 0
    global_step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"val_accuracy": None, "epoch": None})
    best_state: dict[str, torch.Tensor] | None = None  # weights of the best validation epoch
    metrics_lines: int = 0
    compiling: bool = False  # until the first step of this process has compiled

    @property
    def class_names(self) -> list[str]:
        return list(self.bundle.spec.class_names)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return int(round(self.cfg.warmup_epochs * self.steps_per_epoch))


def lock_run_dir(run_dir: Path, info: dist_utils.DistInfo, held: ExitStack) -> None:
    """Hold the run directory's lock (rank 0, the only writer) until `held` closes; a second
    process writing the same directory is refused with the holder's pid (`LockedError`)."""
    if not info.is_main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TrainingError(f"--out {run_dir} is a file; the run directory must be a folder") from None
    except OSError as e:
        raise TrainingError(f"{run_dir}: cannot create the run directory ({e.strerror or e})") from None
    held.enter_context(exclusive_lock(run_dir / LOCK_NAME, f"run directory {run_dir}"))


def _checked_resume(resume: str | Path, cfg: TrainConfig, info: dist_utils.DistInfo):
    """The resume file of run `resume`, refused when `cfg` or the process count differ from it."""
    tensors, state = load_resume_state(resume)
    try:
        stored = config_from_dict(state["config"]).resolved()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{Path(resume) / RESUME_NAME}: field 'state.config': {e}") from None
    diff = [f.name for f in fields(TrainConfig) if f.name not in RESUME_MUTABLE and getattr(stored, f.name) != getattr(cfg, f.name)]
    if diff:
        raise TrainingError(f"{resume}: settings differ from the stored run: {', '.join(diff)}")
    if state["world_size"] != info.world_size:
        raise TrainingError(
            f"{resume}: the run used {state['world_size']} processes; resume it with the same number "
            f"(this one has {info.world_size}) so that every rank sees the same samples"
        )
    return tensors, state


def _new_run_dir(cfg: TrainConfig, info: dist_utils.DistInfo, device: torch.device, overwrite: bool,
                 held: ExitStack) -> Path:
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method.name)
    run_dir = Path(dist_utils.broadcast_text(str(run_dir), info, device))
    lock_run_dir(run_dir, info, held)  # before the check, so that two fresh runs cannot both pass it
    if not overwrite and (run_dir / CONFIG_NAME).exists():
        raise TrainingError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
            "choose another --out, or pass --overwrite"
        )
    return run_dir


def _build_data(cfg: TrainConfig):
    from tmkt.data.registry import build_data

    try:
        return build_data(
            cfg.dataset,
            timesteps=cfg.timesteps,
            input_size=cfg.input_size,
            data_root=cfg.data_root,
            static_root=cfg.static_root,
            event_fraction=cfg.event_fraction,
            seed=cfg.seed,
            cache_dir=cfg.cache_dir,
            options=dict(cfg.data_options) or None,
        )
    except ValueError as e:  # the data package reports a bad name, option or folder as ValueError
        raise TrainingDataError(str(e)) from e


def _build_network(cfg: TrainConfig, bundle, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The network (initial weights from the seed alone) and the method loss, on `device`."""
    from tmkt.train.method import build_method

    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig(
        backbone=cfg.backbone, num_classes=len(bundle.spec.class_names), input_size=tuple(bundle.spec.input_size),
        width=cfg.width, neuron=cfg.neuron,
    )
    model = build_model(model_cfg).to(device)
    method = build_method(cfg.method, cfg.timesteps).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if method.needs_static_images and not bundle.has_static:
        raise TrainingError(
            f"method {cfg.method.name!r} transfers from static images but {cfg.dataset!r} has none here "
            "(give --static-root, or use --method dvs)"
        )
    return model, method


def _objective(model: nn.Module, method: nn.Module, device: torch.device, info: dist_utils.DistInfo) -> nn.Module:
    objective: nn.Module = Objective(model, method)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.unused_parameters_possible,
        )
    return objective


def set_up(cfg: TrainConfig, device: torch.device, info: dist_utils.DistInfo, console, say,
            resume: str | Path | None, overwrite: bool, held: ExitStack) -> TrainingRun:
    """Stage 1: run directory (locked until `held` closes), data, network, method loss,
    optimizer; the resume state if any."""
    if cfg.batch_size % info.world_size:
        raise TrainingError(f"batch_size {cfg.batch_size} must be divisible by the {info.world_size} processes")
    per_rank_batch = cfg.batch_size // info.world_size
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir}: not a run directory")
        lock_run_dir(run_dir, info, held)
        resumed = _checked_resume(resume, cfg, info)
    else:
        resumed = None
        run_dir = _new_run_dir(cfg, info, device, overwrite, held)
    bundle = _build_data(cfg)
    model, method = _build_network(cfg, bundle, device)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    if cfg.compile:
        method.compile_core()  # both streams' forward and every loss as one graph (compiled on first step)
    steps_per_epoch = math.ceil(math.ceil(len(bundle.train) / info.world_size) / per_rank_batch)
    run = TrainingRun(
        cfg=cfg, device=device, info=info, console=console, say=say, run_dir=run_dir, bundle=bundle, model=model,
        method=method, objective=_objective(model, method, device, info), optimizer=optimizer,
        per_rank_batch=per_rank_batch, steps_per_epoch=steps_per_epoch,
        workers=loader_workers(cfg.num_workers, device, info), resumed=resumed, compiling=cfg.compile,
    )
    if resumed is not None:
        _continue_from(run, *resumed)
    run.record = {
        "data": bundle.spec.to_dict(),
        "method": cfg.method.to_dict(),
        "train": {**cfg.to_dict(), "world_size": info.world_size, "device_type": device.type},
        "metrics": {},
    }
    if resumed is not None:
        _rewrite_run_files(run)
    elif info.is_main:  # a fresh run (--overwrite included) starts its own metrics, not after another run's
        truncate_metrics(run_dir / METRICS_NAME, 0)
    run.tb = tensorboard(run_dir) if info.is_main else None
    _announce(run)
    return run


def _continue_from(run: TrainingRun, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Restore the checked resume state: weights, method, optimizer, counters, the best weights."""
    path = run.run_dir / RESUME_NAME
    restore_training_state(tensors, state, run.model, run.method, run.optimizer, run.device, path)
    spe = run.steps_per_epoch
    epoch, step = state["epoch"], state["step_in_epoch"]
    if epoch > run.cfg.epochs or step > spe or (epoch == run.cfg.epochs and step):
        raise CheckpointError(f"{path}: field 'state.epoch'/'state.step_in_epoch' ({epoch}, {step}) lies outside the "
                              f"run's {run.cfg.epochs} epochs of {spe} steps")
    if state["global_step"] != epoch * spe + step:
        raise CheckpointError(f"{path}: field 'state.global_step' is {state['global_step']}, but epoch {epoch} and "
                              f"step {step} of {spe} steps per epoch make {epoch * spe + step}")
    if state.get("metrics_lines") != epoch:
        raise CheckpointError(f"{path}: field 'state.metrics_lines' must equal state.epoch ({epoch}), got "
                              f"{state.get('metrics_lines')!r}")
    run.start_epoch, run.start_step = epoch, step
    run.global_step, run.best, run.metrics_lines = state["global_step"], state["best"], state["metrics_lines"]
    run.best_state = _resumed_best(run, tensors, state)
    _check_same_run(run)
    if run.info.is_main:
        truncate_metrics(run.run_dir / METRICS_NAME, state["metrics_lines"])
    run.say(f"[bold]resuming[/] {run.run_dir} at epoch {run.start_epoch + 1}, step {run.start_step}")


def _resumed_best(run: TrainingRun, tensors: dict[str, torch.Tensor], state: dict[str, Any]):
    """The best weights so far: the resume file's own copy (`best.*`); for a resume file written
    before it kept one, model.safetensors, checked. Never the current weights in their place."""
    path = run.run_dir / RESUME_NAME
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    epoch = state["best"]["epoch"]
    if epoch is None:
        if best:
            raise CheckpointError(f"{path}: holds best.* weights but field 'state.best.epoch' is null")
        return None
    if best:
        return best
    if "tensor_names" in state:  # this file format always stores the best weights once there are some
        raise CheckpointError(f"{path}: the best weights (epoch {epoch}) are missing from the file (tensors best.*)")
    wpath = run.run_dir / BEST_NAME
    if not wpath.exists():
        raise CheckpointError(f"{wpath}: missing; the run's best weights (epoch {epoch}) were there and the resume "
                              "state (written before it kept a copy) has none: cannot resume without them")
    try:
        recorded = read_config(run.run_dir).get(FILES_FIELD, {}).get(BEST_NAME)
    except CheckpointError:
        recorded = None
    state_dict, _ = read_weights(wpath, model_state(run.model), recorded=recorded)
    return state_dict


def _check_same_run(run: TrainingRun) -> None:
    """Refuse a run directory whose config.json describes another network or data than its resume
    state (files of two runs mixed). A damaged or missing config.json is only rewritten."""
    if not (run.run_dir / CONFIG_NAME).exists():
        return
    try:
        stored = read_config(run.run_dir)
    except CheckpointError as e:
        run.say(f"[yellow]note[/]: {e}; it is rewritten from the resume state", highlight=False, soft_wrap=True)
        return
    spec = run.bundle.spec.to_dict()
    pairs = [(f"model.{k}", stored["model"].get(k), v) for k, v in run.model.cfg.to_dict().items()]
    pairs += [(f"data.{k}", stored["data"].get(k), spec[k]) for k in ("name", "class_names", "input_size", "timesteps")]
    for key, a, b in pairs:
        if a != b:
            raise TrainingError(
                f"{run.run_dir}: {CONFIG_NAME} and {RESUME_NAME} describe different runs ({key}: {a!r} vs {b!r}); "
                "refusing to resume"
            )


def _rewrite_run_files(run: TrainingRun) -> None:
    """Make model.safetensors, last.safetensors and config.json agree with the resume state at once
    (a kill between two writes of the last save, a deleted or damaged weights file): the best
    weights (or, before any validation, the current ones) and the current weights, recorded."""
    if not run.info.is_main:
        return
    run.record["metrics"] = metrics_record(run.best, run.metrics_lines)
    current = model_state(run.model)
    if run.best_state is not None:
        try:
            read_weights(run.run_dir / BEST_NAME, current)
        except CheckpointError as e:
            run.say(f"[yellow]note[/]: {e}; restored the best weights (epoch {run.best['epoch']}) from {RESUME_NAME}",
                    highlight=False, soft_wrap=True)
    save_run(run.run_dir, run.model, run.record, weights_name=BEST_NAME,
             state=run.best_state if run.best_state is not None else current)
    save_run(run.run_dir, run.model, run.record, weights_name=LAST_NAME)


def _announce(run: TrainingRun) -> None:
    cfg, info, bundle = run.cfg, run.info, run.bundle
    if not info.is_main:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.say(
        f"[bold]tmkt train[/] {cfg.method.name} on {cfg.dataset}: {len(bundle.train)} train / {len(bundle.val)} val / "
        f"{len(bundle.test)} test, T={cfg.timesteps}, {tuple(bundle.spec.input_size)}, {cfg.backbone}, "
        f"{cfg.epochs} epochs x {run.steps_per_epoch} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, "
        f"{run.device}{f' x {info.world_size}' if info.enabled else ''}"
    )
    run.say(f"run directory: {run.run_dir}")
    if cfg.compile:
        run.say("--compile: the first step compiles the training step (minutes; later steps are faster)")
