"""The training loop: data -> model + method loss -> AdamW with warm-up and cosine -> run directory.

`train(cfg)` runs three stages, each a function of its own: set-up (`tmkt.train.setup.set_up`: data, network,
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

One writer per run directory: `set_up` takes the directory's lock (`.tmkt.lock`, flock) before
anything is written and `train` holds it to the end; a second `tmkt train` on the same
directory is refused with the holder's pid. The resume state keeps its own copy of the best
weights, and a resumed run first rewrites model.safetensors, last.safetensors and config.json
from it, so the directory's files agree again after any interruption.

Distributed: under torchrun each rank trains on a `DistributedSampler` shard; the network
and the method loss are wrapped together in one `DistributedDataParallel` module, so the two
forward passes per step (event and mixed streams) and the method's parameters are all in
the one gradient all-reduce; BatchNorm buffers follow rank 0 (DDP's broadcast). Only rank 0
logs and writes.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tmkt.checkpoint import model_state, save_run
from tmkt.train import distributed as dist_utils
from tmkt.train.config import TrainConfig
from tmkt.train.errors import TrainingError, TrainingInterrupted
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
)
from tmkt.train.resume import RESUME_NAME, restore_rng, resume_tensors, rng_tensors, save_resume_state
from tmkt.train.setup import BEST_NAME, LAST_NAME, TrainingRun, cpu_threads, resolve_device, set_up
from tmkt.train.signals import StopFlag, catch_stop_signals
from tmkt.train.step import deterministic, lr_at, seed_epoch, train_step



@dataclass
class TrainResult:
    """What `train` returns: the run directory, its final metrics (as in config.json) and the
    network with the best weights (eval mode, on the training device)."""

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None
    method: nn.Module | None = None  # the method loss with its learned parameters (e.g. eta)


def _dataloader(dataset: Dataset, indices: list[int], batch_size: int, num_workers: int, device: torch.device):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,  # any iterable of indices: the epoch's shard, minus the steps already done
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


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
        # held: the run directory's lock, released when training ends however it ends
        with deterministic(device.type == "cpu"), cpu_threads(cfg.threads), ExitStack() as held:
            run = set_up(cfg, device, info, console, say, resume, overwrite, held)
            with catch_stop_signals() as stop:
                for epoch in range(run.start_epoch, cfg.epochs):
                    _train_epoch(run, epoch, stop)
            return _final_test(run)
    finally:
        dist_utils.shutdown(info)


# ------------------------------------------------------------------ stage 2: one epoch


class _FinishedStep(NamedTuple):
    """A step whose loss and logs are still on the device (read once the next step is queued)."""

    loss: torch.Tensor
    logs: dict[str, Any]
    samples: int
    index: int


def _save_checkpoint(run: TrainingRun, epoch: int, step_in_epoch: int, partial_sums: dict[str, float] | None = None) -> None:
    """Write last weights and the resume state (rank 0), RNG states gathered from every rank."""
    rng = {k: torch.stack(dist_utils.all_gather_bytes(v, run.info, run.device)) for k, v in rng_tensors(run.generator).items()}
    if not run.info.is_main:
        return
    run.record["metrics"] = metrics_record(run.best, run.metrics_lines)
    if run.best["epoch"] is None:
        save_run(run.run_dir, run.model, run.record, weights_name=BEST_NAME)  # so the run directory always loads
    save_run(run.run_dir, run.model, run.record, weights_name=LAST_NAME)
    tensors, rest = resume_tensors(model_state(run.model), run.method, run.optimizer, rng, run.best_state)
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


def _settle(run: TrainingRun, epoch: int, step: _FinishedStep, sums: dict[str, float], bar, task) -> None:
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


def _stop_mid_epoch(run: TrainingRun, epoch: int, steps_done: int, sums: dict[str, float], signum: int) -> None:
    dist_utils.broadcast_buffers(run.model, run.info)
    _save_checkpoint(run, epoch, steps_done, reduce_sums(sums, run.info, run.device))
    run.say(f"\n[yellow]interrupted[/]: saved {run.run_dir / LAST_NAME} and the resume state.")
    run.say(f"resume with: [bold]tmkt train --resume {run.run_dir}[/]")
    raise TrainingInterrupted(run.run_dir, epoch, steps_done, signum or signal.SIGINT)


def _epoch_loader(run: TrainingRun, epoch: int) -> tuple[DataLoader, int, dict[str, float]]:
    """The epoch's loader (seeded from (seed, epoch, rank)), the steps already done, their sums."""
    cfg, info = run.cfg, run.info
    seed_epoch(cfg.seed, epoch, info.rank, run.generator)
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


def _train_steps(run: TrainingRun, epoch: int, stop: StopFlag) -> dict[str, float]:
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


def _validate(run: TrainingRun, epoch: int, row: dict[str, Any]) -> None:
    """Validation accuracy into `row`; a new best is kept in memory and saved as model.safetensors."""
    val = _eval_split(run.model, run.bundle.val, run.class_names, run.cfg.eval_batch_size, run.device, run.info)
    row["val_acc"] = val["accuracy"]
    if run.best["val_accuracy"] is None or val["accuracy"] > run.best["val_accuracy"]:
        run.best = {"val_accuracy": val["accuracy"], "epoch": epoch + 1}
        run.best_state = {k: v.detach().cpu().clone() for k, v in model_state(run.model).items()}
        if run.info.is_main:
            run.record["metrics"] = metrics_record(run.best, run.metrics_lines + 1)
            save_run(run.run_dir, run.model, run.record, weights_name=BEST_NAME)


def _train_epoch(run: TrainingRun, epoch: int, stop: StopFlag) -> None:
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


def _final_test(run: TrainingRun) -> TrainResult:
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
