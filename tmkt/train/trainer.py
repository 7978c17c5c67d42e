"""The training loop: data -> model + method loss -> AdamW with warm-up and cosine -> run directory.

`train(cfg)` runs three stages, each a function of its own: set-up (`_set_up`: data, network,
method loss, optimizer, resume), one epoch (`_train_epoch`: steps, validation, metrics, resume
state) and the final test of the best weights (`_final_test`). Set-up builds the data set (`tmkt.data.registry.build_data`), the network
(`tmkt.models.build_model`) and the method's loss (`tmkt.train.method.build_method`, whose
learnable parameters, e.g. EKT's per-step eta, are optimised with the network), then trains
for `cfg.epochs` epochs and writes into the run directory:

- `model.safetensors` the best weights on the validation set, `last.safetensors` the latest,
  `config.json` (everything needed to rebuild the model and its data, see `tmkt.checkpoint`),
- `metrics.jsonl`, one line per epoch (train loss / accuracy, val accuracy, lr, seconds),
  plus TensorBoard event files when `torch.utils.tensorboard` imports,
- `resume.safetensors`, the state to continue exactly where the run stopped
  (`tmkt.train.resume`); metrics and TensorBoard are written by `tmkt.train.metrics`.

Determinism: every random stream is derived from `(seed, epoch, rank)` at the start of each
epoch (shuffling, static pairing, the method's generator, torch's global RNG) and the RNG states
are saved at step boundaries, so a resumed run (after the end of an epoch or after Ctrl-C in
the middle of one) takes the same steps as an uninterrupted one; on CPU, with
`num_workers=0`, the weights come out bitwise equal.

Ctrl-C (SIGINT, and SIGTERM as sent by schedulers and by torchrun on shutdown) is caught: the
current step finishes, `last.safetensors` and the resume state are written, and
`TrainingInterrupted` is raised (the CLI exits with 130). A second Ctrl-C aborts at once;
the files of the previous save stay valid because every write is atomic.

Distributed: under torchrun each rank trains on a `DistributedSampler` shard; the network
and the method loss are wrapped together in one `DistributedDataParallel` module, so the two
forward passes per step (event and mixed streams) and the method's parameters are all in
the one gradient all-reduce; BatchNorm buffers follow rank 0 (DDP's broadcast). Only rank 0
logs and writes.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tmkt.checkpoint import CONFIG_NAME, CheckpointError, model_state, save_run
from tmkt.errors import TmktError
from tmkt.models import ModelConfig, build_model
from tmkt.train import distributed as dist_utils
from tmkt.train.config import TrainConfig, config_from_dict
from tmkt.train.evaluate import confusion, summarize
from tmkt.train.metrics import (
    METRICS_NAME,
    accumulate,
    append_metrics,
    epoch_line,
    mean,
    metrics_record,
    progress_bar,
    reduce_means,
    reduce_sums,
    tensorboard,
    truncate_metrics,
)
from tmkt.train.resume import (  # noqa: F401  (load_resume_state: part of the trainer's API)
    RESUME_MUTABLE,
    RESUME_NAME,
    load_resume_state,
    restore_rng,
    restore_training_state,
    resume_tensors,
    rng_tensors,
    save_resume_state,
)

LAST_NAME = "last.safetensors"
BEST_NAME = "model.safetensors"


class TrainingError(TmktError, RuntimeError):
    """Training cannot go on (diverged loss, unusable data, mismatched resume)."""


class TrainingDataError(TrainingError, ValueError):
    """The data set cannot be built as configured (name, option, folder); the data package
    reports these as ValueError, which this class still is."""


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM once the resume state is on disk."""

    def __init__(self, run_dir: Path, epoch: int, step: int, signum: int) -> None:
        super().__init__(f"training interrupted at epoch {epoch + 1}, step {step}; resume with: tmkt train --resume {run_dir}")
        self.run_dir = run_dir
        self.epoch = epoch
        self.step = step
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class TrainResult:
    """What `train` returns: the run directory, its final metrics (as in config.json) and the
    network with the best weights (eval mode, on the training device)."""

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None
    method: nn.Module | None = None  # the method loss with its learned parameters (e.g. eta)


# ------------------------------------------------------------------ schedule


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Learning rate of iteration `step` (0-based): linear warm-up to `peak`, cosine to `floor`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for one (seed, epoch, rank) stream."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _seed_epoch(seed: int, epoch: int, rank: int, generator: torch.Generator) -> None:
    s = _epoch_seed(seed, epoch, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    generator.manual_seed(s ^ 0x5DEECE66D)


# ------------------------------------------------------------------ helpers


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


def default_run_dir(method: str, root: str | Path = "runs") -> Path:
    """`runs/<YYYYmmdd-HHMMSS>-<method>`, with a numeric suffix if that already exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{stamp}-{method}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{method}-{n}"
    return path


class Objective(nn.Module):
    """The network and the method loss as one module, so DDP sees one forward per step and
    all-reduces the gradients of both (the method calls the network twice per step)."""

    def __init__(self, net: nn.Module, method: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, static, events, labels, progress: float, generator: torch.Generator):
        return self.method(self.net, static, events, labels, progress, generator)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused implementation, which updates every parameter in a few kernels."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lr: float,
    progress: float,
    generator: torch.Generator,
    device: torch.device,
    amp: bool,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step on a loader batch ``(static, events, labels)`` (static empty for dvs).

    Returns the detached loss and the method's logs, still on the device: nothing here waits for
    the GPU, so the caller decides when to read them (bf16 autocast on CUDA when ``amp``).
    """
    static, events, labels = batch
    for g in optimizer.param_groups:
        g["lr"] = lr
    static = static.to(device, non_blocking=True) if static.numel() else None
    events = events.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    use_amp = amp and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext():
        loss, logs = objective(static, events, labels, progress, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logs


class _StopFlag:
    """SIGINT / SIGTERM handler: the first signal asks to stop after the current step, the
    second raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum, _frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0


@contextmanager
def _catch_stop_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals are only delivered to the main thread; nothing to install
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, flag)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms` for the duration of training (restored after)."""
    if not enabled:
        yield
        return
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The stored settings of a run, with only `RESUME_MUTABLE` keys changeable by `overrides`."""
    _, state = load_resume_state(run_dir)
    try:
        cfg = config_from_dict(state["config"])
    except ValueError as e:
        raise CheckpointError(f"{Path(run_dir) / RESUME_NAME}: field 'state.config': {e}") from None
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    fixed = sorted(k for k in changes if k not in RESUME_MUTABLE)
    if fixed:
        raise TrainingError(
            f"--resume continues the run with its own settings; {', '.join(fixed)} cannot change "
            f"(only {', '.join(RESUME_MUTABLE)} may)"
        )
    return config_from_dict(changes, cfg)


# ------------------------------------------------------------------ the loop


def _dataloader(dataset: Dataset, indices: list[int], batch_size: int, num_workers: int, device: torch.device):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,  # any iterable of indices: the epoch's shard, minus the steps already done
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


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


def _epoch_indices(n: int, epoch: int, seed: int, info: dist_utils.DistInfo) -> list[int]:
    sampler = DistributedSampler(range(n), num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def _eval_split(
    model: nn.Module, dataset: Dataset, class_names, batch_size: int, device, info: dist_utils.DistInfo
) -> dict[str, Any]:
    """Accuracy on `dataset`, each rank counting its stride of the samples, counts summed."""
    part = torch.utils.data.Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.enabled else dataset
    counts = confusion(model, part, len(class_names), batch_size, device)
    return summarize(dist_utils.all_reduce_sum(counts, info, device), class_names)


def train(
    cfg: TrainConfig, console=None, *, resume: str | Path | None = None, overwrite: bool = False
) -> TrainResult:
    """Train `cfg` (or continue the run in `resume`, whose config `cfg` must be, see
    `resume_config`) and return the run directory with its final metrics. A fresh run refuses an
    `out` folder that already holds a run unless `overwrite`, so no trained model is lost by accident.

    Raises:
        TrainingInterrupted: after SIGINT / SIGTERM, once last weights and resume state are saved.
        TrainingError: diverging loss, a method that needs static images without them, ...
    """
    from rich.console import Console

    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    info = dist_utils.init(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    console = console if console is not None else Console()
    say = console.print if info.is_main else (lambda *a, **k: None)
    try:
        with _deterministic(device.type == "cpu"):
            run = _set_up(cfg, device, info, console, say, resume, overwrite)
            with _catch_stop_signals() as stop:
                for epoch in range(run.start_epoch, cfg.epochs):
                    _train_epoch(run, epoch, stop)
            return _final_test(run)
    finally:
        dist_utils.shutdown(info)


# ------------------------------------------------------------------ stage 1: set-up


@dataclass(eq=False)
class _Run:
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


def _checked_resume(resume: str | Path, cfg: TrainConfig, info: dist_utils.DistInfo):
    """The resume file of run `resume`, refused when `cfg` or the process count differ from it."""
    tensors, state = load_resume_state(resume)
    stored = config_from_dict(state["config"]).resolved()
    diff = [f.name for f in fields(TrainConfig) if f.name not in RESUME_MUTABLE and getattr(stored, f.name) != getattr(cfg, f.name)]
    if diff:
        raise TrainingError(f"{resume}: settings differ from the stored run: {', '.join(diff)}")
    if state["world_size"] != info.world_size:
        raise TrainingError(
            f"{resume}: the run used {state['world_size']} processes; resume it with the same number "
            f"(this one has {info.world_size}) so that every rank sees the same samples"
        )
    return tensors, state


def _new_run_dir(cfg: TrainConfig, info: dist_utils.DistInfo, device: torch.device, overwrite: bool) -> Path:
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method.name)
    run_dir = Path(dist_utils.broadcast_text(str(run_dir), info, device))
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


def _set_up(cfg: TrainConfig, device: torch.device, info: dist_utils.DistInfo, console, say,
            resume: str | Path | None, overwrite: bool) -> _Run:
    """Stage 1: run directory, data, network, method loss, optimizer; the resume state if any."""
    if cfg.batch_size % info.world_size:
        raise TrainingError(f"batch_size {cfg.batch_size} must be divisible by the {info.world_size} processes")
    per_rank_batch = cfg.batch_size // info.world_size
    resumed = _checked_resume(resume, cfg, info) if resume is not None else None
    run_dir = Path(resume) if resume is not None else _new_run_dir(cfg, info, device, overwrite)
    bundle = _build_data(cfg)
    model, method = _build_network(cfg, bundle, device)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    if cfg.compile:
        method.compile_core()  # both streams' forward and every loss as one graph (compiled on first step)
    steps_per_epoch = math.ceil(math.ceil(len(bundle.train) / info.world_size) / per_rank_batch)
    run = _Run(
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
    if run.best["epoch"] is not None and (run_dir / BEST_NAME).exists():
        run.best_state = load_file(str(run_dir / BEST_NAME))
    run.tb = tensorboard(run_dir) if info.is_main else None
    _announce(run)
    return run


def _continue_from(run: _Run, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    restore_training_state(tensors, state, run.model, run.method, run.optimizer, run.device)
    run.start_epoch, run.start_step = state["epoch"], state["step_in_epoch"]
    run.global_step, run.best, run.metrics_lines = state["global_step"], state["best"], state["metrics_lines"]
    if run.info.is_main:
        truncate_metrics(run.run_dir / METRICS_NAME, state["metrics_lines"])
    run.say(f"[bold]resuming[/] {run.run_dir} at epoch {run.start_epoch + 1}, step {run.start_step}")


def _announce(run: _Run) -> None:
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


# ------------------------------------------------------------------ stage 2: one epoch


class _FinishedStep(NamedTuple):
    """A step whose loss and logs are still on the device (read once the next step is queued)."""

    loss: torch.Tensor
    logs: dict[str, Any]
    samples: int
    index: int


def _save_checkpoint(run: _Run, epoch: int, step_in_epoch: int, partial_sums: dict[str, float] | None = None) -> None:
    """Write last weights and the resume state (rank 0), RNG states gathered from every rank."""
    rng = {k: torch.stack(dist_utils.all_gather_bytes(v, run.info, run.device)) for k, v in rng_tensors(run.generator).items()}
    if not run.info.is_main:
        return
    run.record["metrics"] = metrics_record(run.best, run.metrics_lines)
    if run.best["epoch"] is None:
        save_run(run.run_dir, run.model, run.record, weights_name=BEST_NAME)  # so the run directory always loads
    save_run(run.run_dir, run.model, run.record, weights_name=LAST_NAME)
    tensors, rest = resume_tensors(model_state(run.model), run.method, run.optimizer, rng)
    state = {
        "config": run.cfg.to_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": run.global_step,
        "best": run.best,
        "optimizer": rest["optimizer"],
        "world_size": run.info.world_size,
        "metrics_lines": run.metrics_lines,
        "partial_sums": partial_sums or {},
        "rng": rest["rng"],
    }
    save_resume_state(run.run_dir / RESUME_NAME, tensors, state)


def _settle(run: _Run, epoch: int, step: _FinishedStep, sums: dict[str, float], bar, task) -> None:
    """Turn one finished step's loss and logs into floats. Called once the next step is queued,
    so on a GPU this host sync waits for work that is already done instead of stalling the
    queue in the middle of a step."""
    value = float(step.loss)
    if not math.isfinite(value):
        raise TrainingError(
            f"loss became {value} at epoch {epoch + 1}, step {step.index + 1}; try a lower --lr (now {run.cfg.lr:g})"
        )
    accumulate(sums, {**{k: float(v) for k, v in step.logs.items()}, "loss": value}, step.samples)
    shown = f"loss {mean(sums, 'loss'):.4f}"
    if "acc_event" in sums:
        shown += f"  acc {mean(sums, 'acc_event'):.3f}"
    bar.update(task, advance=1, info=shown)


def _stop_mid_epoch(run: _Run, epoch: int, steps_done: int, sums: dict[str, float], signum: int) -> None:
    dist_utils.broadcast_buffers(run.model, run.info)
    _save_checkpoint(run, epoch, steps_done, reduce_sums(sums, run.info, run.device))
    run.say(f"\n[yellow]interrupted[/]: saved {run.run_dir / LAST_NAME} and the resume state.")
    run.say(f"resume with: [bold]tmkt train --resume {run.run_dir}[/]")
    raise TrainingInterrupted(run.run_dir, epoch, steps_done, signum or signal.SIGINT)


def _epoch_loader(run: _Run, epoch: int) -> tuple[DataLoader, int, dict[str, float]]:
    """The epoch's loader (seeded from (seed, epoch, rank)), the steps already done, their sums."""
    cfg, info = run.cfg, run.info
    _seed_epoch(cfg.seed, epoch, info.rank, run.generator)
    indices = _epoch_indices(len(run.bundle.train), epoch, cfg.seed, info)
    skip, sums = 0, {}
    if run.resumed is not None and epoch == run.start_epoch and run.start_step:
        tensors, state = run.resumed
        skip = run.start_step
        restore_rng(tensors, state, info.rank, run.generator)
        # The stored sums are over all ranks: rank 0 carries them, the others add zeros.
        sums = {k: (v if info.is_main else 0.0) for k, v in state.get("partial_sums", {}).items()}
    if hasattr(run.bundle.train, "set_epoch"):
        run.bundle.train.set_epoch(epoch)
    loader = _dataloader(run.bundle.train, indices[skip * run.per_rank_batch :], run.per_rank_batch, run.workers, run.device)
    return loader, skip, sums


def _train_steps(run: _Run, epoch: int, stop: _StopFlag) -> dict[str, float]:
    """The optimizer steps of one epoch; returns the sample-weighted sums of loss and logs."""
    cfg = run.cfg
    loader, skip, sums = _epoch_loader(run, epoch)
    run.model.train()
    run.method.train()
    with progress_bar(run.console, run.info.is_main) as bar:
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=run.steps_per_epoch, completed=skip, info="")
        pending = None
        for i, batch in enumerate(loader, start=skip):
            lr = lr_at(run.global_step, run.total_steps, run.warmup_steps, cfg.lr, cfg.min_lr)
            progress = run.global_step / max(1, run.total_steps)
            t_step = time.perf_counter()
            loss, logs = train_step(run.objective, run.optimizer, batch, lr, progress, run.generator, run.device, cfg.amp)
            if run.compiling:
                run.say(f"first (compiling) step: {time.perf_counter() - t_step:.0f} s")
                run.compiling = False
            run.global_step += 1
            if pending is not None:
                _settle(run, epoch, pending, sums, bar, task)
            pending = _FinishedStep(loss, logs, int(batch[2].shape[0]), i)
            if dist_utils.any_rank(stop.requested, run.info, run.device):
                _settle(run, epoch, pending, sums, bar, task)
                _stop_mid_epoch(run, epoch, i + 1, sums, stop.signum)
        if pending is not None:
            _settle(run, epoch, pending, sums, bar, task)
    return sums


def _validate(run: _Run, epoch: int, row: dict[str, Any]) -> None:
    """Validation accuracy into `row`; a new best is kept in memory and saved as model.safetensors."""
    val = _eval_split(run.model, run.bundle.val, run.class_names, run.cfg.eval_batch_size, run.device, run.info)
    row["val_acc"] = val["accuracy"]
    if run.best["val_accuracy"] is None or val["accuracy"] > run.best["val_accuracy"]:
        run.best = {"val_accuracy": val["accuracy"], "epoch": epoch + 1}
        run.best_state = {k: v.detach().cpu().clone() for k, v in model_state(run.model).items()}
        if run.info.is_main:
            run.record["metrics"] = metrics_record(run.best, run.metrics_lines + 1)
            save_run(run.run_dir, run.model, run.record, weights_name=BEST_NAME)


def _train_epoch(run: _Run, epoch: int, stop: _StopFlag) -> None:
    """Stage 2: one epoch of steps, then validation, the metrics line and the resume state."""
    cfg, info = run.cfg, run.info
    t0 = time.perf_counter()
    sums = _train_steps(run, epoch, stop)
    # DDP broadcasts rank 0's BatchNorm buffers before each forward; after the epoch's last
    # update they differ, so make them rank 0's again before evaluating and saving.
    dist_utils.broadcast_buffers(run.model, info)
    train_stats = reduce_means(sums, info, run.device)
    row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_stats.pop("loss")}
    if "acc_event" in train_stats:
        row["train_acc"] = train_stats.pop("acc_event")
    row.update({f"train_{k}": v for k, v in train_stats.items()})
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        _validate(run, epoch, row)
    row["lr"] = run.optimizer.param_groups[0]["lr"]
    row["seconds"] = round(time.perf_counter() - t0, 3)
    if info.is_main:
        append_metrics(run.run_dir / METRICS_NAME, row, run.tb)
    run.metrics_lines += 1
    _save_checkpoint(run, epoch + 1, 0)
    run.say(epoch_line(row, run.best))
    if dist_utils.any_rank(stop.requested, info, run.device):
        run.say(f"[yellow]interrupted[/]: resume with: [bold]tmkt train --resume {run.run_dir}[/]")
        raise TrainingInterrupted(run.run_dir, epoch + 1, 0, stop.signum or signal.SIGINT)


# ------------------------------------------------------------------ stage 3: final test


def _final_test(run: _Run) -> TrainResult:
    """Stage 3: the best weights on the test split, with the same float32 evaluation `tmkt eval` runs."""
    cfg, info = run.cfg, run.info
    if run.best_state is not None:
        run.model.load_state_dict(run.best_state, strict=False)
    test = _eval_split(run.model, run.bundle.test, run.class_names, cfg.eval_batch_size, run.device, info)
    best_epoch_metrics = {
        **metrics_record(run.best, run.metrics_lines),
        "test_accuracy": test["accuracy"],
        "test_correct": test["correct"],
        "test_total": test["total"],
    }
    if info.is_main:
        run.record["metrics"] = best_epoch_metrics
        save_run(run.run_dir, run.model, run.record, weights_name=BEST_NAME)
        if run.tb is not None:
            run.tb.add_scalar("test/accuracy", test["accuracy"], cfg.epochs)
            run.tb.close()
        run.say(
            f"[bold green]done[/]: best val {run.best['val_accuracy']:.4f} (epoch {run.best['epoch']}), "
            f"test accuracy {test['accuracy']:.4f} ({test['correct']}/{test['total']})"
        )
    dist_utils.barrier(info)
    run.model.eval()
    return TrainResult(run_dir=run.run_dir, metrics=best_epoch_metrics, model=run.model, method=run.method)
