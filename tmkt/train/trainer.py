"""The training loop: data -> model + method loss -> AdamW with warm-up and cosine -> run directory.

`train(cfg)` builds the data set (`tmkt.data.registry.build_data`), the network
(`tmkt.models.build_model`) and the method's loss (`tmkt.train.method.build_method`, whose
learnable parameters, e.g. EKT's per-step eta, are optimised with the network), then trains
for `cfg.epochs` epochs and writes into the run directory:

- `model.safetensors` the best weights on the validation set, `last.safetensors` the latest,
  `config.json` (everything needed to rebuild the model and its data, see `tmkt.checkpoint`),
- `metrics.jsonl`, one line per epoch (train loss / accuracy, val accuracy, lr, seconds),
  plus TensorBoard event files when `torch.utils.tensorboard` imports,
- `resume.safetensors`, the state to continue exactly where the run stopped: model, optimizer
  and method tensors and RNG states as tensors; epoch, step, best metric, settings as JSON in
  the file's metadata. One file, written atomically, so model and optimizer never disagree.

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

import json
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tmkt.checkpoint import CONFIG_NAME, CheckpointError, atomic_write_bytes, model_state, save_run, save_weights
from tmkt.errors import TmktError
from tmkt.models import ModelConfig, build_model
from tmkt.train import distributed as dist_utils
from tmkt.train.config import TrainConfig, config_from_dict
from tmkt.train.evaluate import confusion, summarize

RESUME_NAME = "resume.safetensors"
RESUME_FORMAT = "tmkt-resume/1"
METRICS_NAME = "metrics.jsonl"
LAST_NAME = "last.safetensors"
BEST_NAME = "model.safetensors"
# Settings that may change when a run is resumed (where and how fast, not what is computed).
RESUME_MUTABLE = ("device", "num_workers", "eval_batch_size", "cache_dir", "data_root", "static_root", "compile")


class TrainingError(TmktError, RuntimeError):
    """Training cannot go on (diverged loss, unusable data, mismatched resume)."""


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


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _rng_tensor(state: torch.Tensor) -> torch.Tensor:
    return state.detach().clone().to(torch.uint8).cpu()


# ------------------------------------------------------------------ resume state


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

    from tmkt.data.registry import build_data
    from tmkt.train.method import build_method

    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    info = dist_utils.init(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    console = console if console is not None else Console()
    say = console.print if info.is_main else (lambda *a, **k: None)
    try:
        with _deterministic(device.type == "cpu"):
            return _train(cfg, device, info, console, say, resume, build_data, build_method, overwrite)
    finally:
        dist_utils.shutdown(info)


def _train(cfg, device, info, console, say, resume, build_data, build_method, overwrite=False) -> TrainResult:
    if cfg.batch_size % info.world_size:
        raise TrainingError(f"batch_size {cfg.batch_size} must be divisible by the {info.world_size} processes")
    per_rank_batch = cfg.batch_size // info.world_size

    resume_tensors, resume_state = (None, None)
    if resume is not None:
        resume_tensors, resume_state = load_resume_state(resume)
        stored = config_from_dict(resume_state["config"]).resolved()
        diff = [f.name for f in fields(TrainConfig) if f.name not in RESUME_MUTABLE and getattr(stored, f.name) != getattr(cfg, f.name)]
        if diff:
            raise TrainingError(f"{resume}: settings differ from the stored run: {', '.join(diff)}")
        if resume_state["world_size"] != info.world_size:
            raise TrainingError(
                f"{resume}: the run used {resume_state['world_size']} processes; resume it with the same number "
                f"(this one has {info.world_size}) so that every rank sees the same samples"
            )
        run_dir = Path(resume)
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method.name)
        run_dir = Path(dist_utils.broadcast_text(str(run_dir), info, device))
        if not overwrite and (run_dir / CONFIG_NAME).exists():
            raise TrainingError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                "choose another --out, or pass --overwrite"
            )

    bundle = build_data(
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
    spec = bundle.spec
    if cfg.method.name != "dvs" and not bundle.has_static:
        raise TrainingError(
            f"method {cfg.method.name!r} transfers from static images but {cfg.dataset!r} has none here "
            "(give --static-root, or use --method dvs)"
        )
    class_names = list(spec.class_names)

    torch.manual_seed(cfg.seed)  # initial weights depend on the seed alone
    model = build_model(
        ModelConfig(
            backbone=cfg.backbone,
            num_classes=len(class_names),
            input_size=tuple(spec.input_size),
            width=cfg.width,
            neuron=cfg.neuron,
        )
    ).to(device)
    method = build_method(cfg.method, cfg.timesteps).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad] + [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    if cfg.compile:
        method.compile_core()  # both streams' forward and every loss as one graph (compiled on first step)
    objective: nn.Module = Objective(model, method)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Only TMKT uses every parameter each step (both heads, MAG, MRP, eta); the others leave
        # some unused (dvs / finetune: mixed head, MAG, MRP, eta; ekt: MAG, MRP), which DDP must
        # then look for in each backward.
        objective = DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.method.name != "tmkt",
        )

    n_train = len(bundle.train)
    steps_per_epoch = math.ceil(math.ceil(n_train / info.world_size) / per_rank_batch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    generator = torch.Generator()

    start_epoch, start_step, global_step = 0, 0, 0
    best = {"val_accuracy": None, "epoch": None}
    if resume_state is not None:
        model.load_state_dict({k[6:]: v for k, v in resume_tensors.items() if k.startswith("model.")}, strict=False)
        method.load_state_dict({k[7:]: v.to(device) for k, v in resume_tensors.items() if k.startswith("method.")})
        optimizer.load_state_dict(_unflatten_optimizer(resume_tensors, resume_state["optimizer"]))
        start_epoch, start_step = resume_state["epoch"], resume_state["step_in_epoch"]
        global_step, best = resume_state["global_step"], resume_state["best"]
        if info.is_main:
            _truncate_metrics(run_dir / METRICS_NAME, resume_state["metrics_lines"])
        say(f"[bold]resuming[/] {run_dir} at epoch {start_epoch + 1}, step {start_step}")

    record = {
        "data": spec.to_dict(),
        "method": cfg.method.to_dict(),
        "train": {**cfg.to_dict(), "world_size": info.world_size, "device_type": device.type},
        "metrics": {},
    }
    best_state = None
    if best["epoch"] is not None and (run_dir / BEST_NAME).exists():
        best_state = load_file(str(run_dir / BEST_NAME))
    tb = _tensorboard(run_dir) if info.is_main else None

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        say(
            f"[bold]tmkt train[/] {cfg.method.name} on {cfg.dataset}: {n_train} train / {len(bundle.val)} val / "
            f"{len(bundle.test)} test, T={cfg.timesteps}, {tuple(spec.input_size)}, {cfg.backbone}, "
            f"{cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, "
            f"{device}{f' x {info.world_size}' if info.enabled else ''}"
        )
        say(f"run directory: {run_dir}")
        if cfg.compile:
            say("--compile: the first step compiles the training step (minutes; later steps are faster)")

    def checkpoint(epoch: int, step_in_epoch: int, metrics_lines: int, partial: dict[str, float] | None = None) -> None:
        """Write last weights and the resume state (rank 0), RNG states gathered from every rank."""
        rng = {
            "method": torch.stack(dist_utils.all_gather_bytes(_rng_tensor(generator.get_state()), info, device)),
            "torch": torch.stack(dist_utils.all_gather_bytes(_rng_tensor(torch.get_rng_state()), info, device)),
        }
        if not info.is_main:
            return
        record["metrics"] = _metrics_record(best, metrics_lines)
        if best["epoch"] is None:
            save_run(run_dir, model, record, weights_name=BEST_NAME)  # so the run directory always loads
        save_run(run_dir, model, record, weights_name=LAST_NAME)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        tensors = {f"model.{k}": v for k, v in model_state(model).items()}
        tensors.update({f"method.{k}": v for k, v in method.state_dict().items()})
        tensors.update(opt_tensors)
        tensors.update({f"rng.method.{r}": t for r, t in enumerate(rng["method"])})
        tensors.update({f"rng.torch.{r}": t for r, t in enumerate(rng["torch"])})
        np_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        state = {
            "config": cfg.to_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "best": best,
            "optimizer": opt_meta,
            "world_size": info.world_size,
            "metrics_lines": metrics_lines,
            "partial_sums": partial or {},
            "rng": {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "python": _py_rng()},
        }
        save_resume_state(run_dir / RESUME_NAME, tensors, state)

    metrics_lines = resume_state["metrics_lines"] if resume_state else 0
    workers = loader_workers(cfg.num_workers, device, info)
    compiling = cfg.compile  # until the first step of this process has compiled
    with _catch_stop_signals() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            _seed_epoch(cfg.seed, epoch, info.rank, generator)
            indices = _epoch_indices(n_train, epoch, cfg.seed, info)
            skip = 0
            sums: dict[str, float] = {}
            if resume_state is not None and epoch == start_epoch and start_step:
                skip = start_step
                _restore_rng(resume_tensors, resume_state, info.rank, generator)
                # The stored sums are over all ranks: rank 0 carries them, the others add zeros.
                sums = {k: (v if info.is_main else 0.0) for k, v in resume_state.get("partial_sums", {}).items()}
            if hasattr(bundle.train, "set_epoch"):
                bundle.train.set_epoch(epoch)
            loader = _dataloader(bundle.train, indices[skip * per_rank_batch :], per_rank_batch, workers, device)
            model.train()
            method.train()
            progress_bar = _progress(console, info.is_main)
            with progress_bar as bar:
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, completed=skip, info="")
                pending = None

                def settle(step) -> None:
                    """Turn one finished step's loss and logs into floats. Called once the next
                    step is queued, so on a GPU this host sync waits for work that is already
                    done instead of stalling the queue in the middle of a step."""
                    loss_t, logs, b, i = step
                    value = float(loss_t)
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"loss became {value} at epoch {epoch + 1}, step {i + 1}; try a lower --lr (now {cfg.lr:g})"
                        )
                    _accumulate(sums, {**{k: float(v) for k, v in logs.items()}, "loss": value}, b)
                    shown = f"loss {_mean(sums, 'loss'):.4f}"
                    if "acc_event" in sums:
                        shown += f"  acc {_mean(sums, 'acc_event'):.3f}"
                    bar.update(task, advance=1, info=shown)

                for i, batch in enumerate(loader, start=skip):
                    lr = lr_at(global_step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
                    progress = global_step / max(1, total_steps)
                    t_step = time.perf_counter()
                    loss, logs = train_step(objective, optimizer, batch, lr, progress, generator, device, cfg.amp)
                    if compiling:
                        say(f"first (compiling) step: {time.perf_counter() - t_step:.0f} s")
                        compiling = False
                    global_step += 1
                    if pending is not None:
                        settle(pending)
                    pending = (loss, logs, int(batch[2].shape[0]), i)
                    if dist_utils.any_rank(stop.requested, info, device):
                        settle(pending)
                        dist_utils.broadcast_buffers(model, info)
                        checkpoint(epoch, i + 1, metrics_lines, _reduce_sums(sums, info, device))
                        say(f"\n[yellow]interrupted[/]: saved {run_dir / LAST_NAME} and the resume state.")
                        say(f"resume with: [bold]tmkt train --resume {run_dir}[/]")
                        raise TrainingInterrupted(run_dir, epoch, i + 1, stop.signum or signal.SIGINT)
                if pending is not None:
                    settle(pending)

            # DDP broadcasts rank 0's BatchNorm buffers before each forward; after the epoch's last
            # update they differ, so make them rank 0's again before evaluating and saving.
            dist_utils.broadcast_buffers(model, info)
            train_stats = _reduce_means(sums, info, device)
            row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_stats.pop("loss")}
            if "acc_event" in train_stats:
                row["train_acc"] = train_stats.pop("acc_event")
            row.update({f"train_{k}": v for k, v in train_stats.items()})
            last_epoch = epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
                val = _eval_split(model, bundle.val, class_names, cfg.eval_batch_size, device, info)
                row["val_acc"] = val["accuracy"]
                if best["val_accuracy"] is None or val["accuracy"] > best["val_accuracy"]:
                    best = {"val_accuracy": val["accuracy"], "epoch": epoch + 1}
                    best_state = {k: v.detach().cpu().clone() for k, v in model_state(model).items()}
                    if info.is_main:
                        record["metrics"] = _metrics_record(best, metrics_lines + 1)
                        save_run(run_dir, model, record, weights_name=BEST_NAME)
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - t0, 3)
            if info.is_main:
                _append_metrics(run_dir / METRICS_NAME, row, tb)
            metrics_lines += 1
            checkpoint(epoch + 1, 0, metrics_lines)
            say(_epoch_line(row, best))
            if dist_utils.any_rank(stop.requested, info, device):
                say(f"[yellow]interrupted[/]: resume with: [bold]tmkt train --resume {run_dir}[/]")
                raise TrainingInterrupted(run_dir, epoch + 1, 0, stop.signum or signal.SIGINT)

    # Final test of the best weights, with the same float32 evaluation `tmkt eval` runs.
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    test = _eval_split(model, bundle.test, class_names, cfg.eval_batch_size, device, info)
    best_epoch_metrics = {
        **_metrics_record(best, metrics_lines),
        "test_accuracy": test["accuracy"],
        "test_correct": test["correct"],
        "test_total": test["total"],
    }
    if info.is_main:
        record["metrics"] = best_epoch_metrics
        save_run(run_dir, model, record, weights_name=BEST_NAME)
        if tb is not None:
            tb.add_scalar("test/accuracy", test["accuracy"], cfg.epochs)
            tb.close()
        say(
            f"[bold green]done[/]: best val {best['val_accuracy']:.4f} (epoch {best['epoch']}), "
            f"test accuracy {test['accuracy']:.4f} ({test['correct']}/{test['total']})"
        )
    dist_utils.barrier(info)
    model.eval()
    return TrainResult(run_dir=run_dir, metrics=best_epoch_metrics, model=model, method=method)


# ------------------------------------------------------------------ small pieces


def _py_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any], rank: int, generator: torch.Generator) -> None:
    """Put back the RNG states saved at a step boundary (mid-epoch resume)."""
    generator.set_state(tensors[f"rng.method.{rank}"].clone())
    torch.set_rng_state(tensors[f"rng.torch.{rank}"].clone())
    name, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))


def _accumulate(sums: dict[str, float], values: dict[str, float], n: int) -> None:
    """Add sample-weighted values and their sample counts (`#key`): some methods log a key only
    in part of the steps (fine-tuning's static phase), so each key keeps its own count."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v * n
        sums[f"#{k}"] = sums.get(f"#{k}", 0.0) + n


def _mean(sums: dict[str, float], key: str) -> float:
    return sums[key] / sums[f"#{key}"]


def _reduce_sums(sums: dict[str, float], info: dist_utils.DistInfo, device: torch.device) -> dict[str, float]:
    """`sums` added over ranks (every rank reports the same keys)."""
    keys = sorted(sums)
    total = dist_utils.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), info, device)
    return dict(zip(keys, total.tolist()))


def _reduce_means(sums: dict[str, float], info: dist_utils.DistInfo, device: torch.device) -> dict[str, float]:
    """Sample-weighted means over the epoch and over ranks."""
    if not sums:
        return {"loss": float("nan")}
    d = _reduce_sums(sums, info, device)
    return {k: _mean(d, k) for k in d if not k.startswith("#")}


def _metrics_record(best: dict[str, Any], epochs_done: int) -> dict[str, Any]:
    return {"best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"], "epochs_done": epochs_done}


def _append_metrics(path: Path, row: dict[str, Any], tb) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if tb is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        tb.flush()


def _truncate_metrics(path: Path, lines: int) -> None:
    """Drop metric lines written after the resume state (an epoch that will be run again)."""
    if path.exists():
        kept = path.read_text().splitlines(keepends=True)[:lines]
        atomic_write_bytes(path, "".join(kept).encode())


def _epoch_line(row: dict[str, Any], best: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"loss {row['train_loss']:.4f}"]
    if "train_acc" in row:
        parts.append(f"train acc {row['train_acc']:.3f}")
    if "val_acc" in row:
        parts.append(f"val acc {row['val_acc']:.3f}" + (" *" if best["epoch"] == row["epoch"] else ""))
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return "  ".join(parts)


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
