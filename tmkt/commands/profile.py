"""`tmkt profile RUN_DIR`: spikes, sparsity, synaptic operations and energy per hardware profile."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tmkt.commands import fail


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)


def _frames_file(path: Path, n: int):
    """[N, T, C, H, W] from .npy, or .npz with `frames` (and optional `labels`) -> (frames, labels)."""
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            frames, labels = data, None
        else:
            with data:
                if "frames" not in data:
                    raise typer.BadParameter(f"{path}: no array named 'frames'", param_hint="--frames")
                frames = data["frames"]
                labels = data["labels"] if "labels" in data else None
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{path}: cannot read ({e})", param_hint="--frames") from None
    if frames.ndim != 5:
        raise typer.BadParameter(f"{path}: frames must be [N, T, C, H, W], got shape {frames.shape}", param_hint="--frames")
    if labels is not None and len(labels) != len(frames):
        raise typer.BadParameter(f"{path}: {len(frames)} samples but {len(labels)} labels", param_hint="--frames")
    frames = frames[:n].astype(np.float32)
    return frames, None if labels is None else np.asarray(labels[:n], dtype=np.int64)


def _dataset_frames(run, name: str, data_root: Optional[Path], cache_dir: Optional[Path], n: int, console):
    """N evenly spaced samples of the test split, binned as the run was trained."""
    import numpy as np

    from tmkt.data.registry import build_data_for_run

    with console.status(f"building data set {name!r}"):
        try:
            bundle = build_data_for_run(
                run.config,
                dataset=name,
                data_root=None if data_root is None else str(data_root),
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        except (ValueError, OSError) as e:  # the data package reports a bad name, option or folder as ValueError
            fail(f"data set {name!r}: {e}")
    test = bundle.test
    if len(test) == 0:
        fail(f"data set {name!r} has an empty test split")
    idx = np.unique(np.linspace(0, len(test) - 1, min(n, len(test))).round().astype(int))
    items = [test[int(i)] for i in idx]
    frames = np.stack([np.asarray(f, dtype=np.float32) for f, _ in items])
    labels = np.asarray([int(lbl) for _, lbl in items], dtype=np.int64)
    return frames, labels


def _neurobench(run, graph, x, labels, prof, batches, batch_size: int, console) -> dict:
    """NeuroBench's harness on the same samples, its table printed; the JSON's `neurobench` section."""
    from importlib.metadata import version

    from tmkt.runtime.neurobench import NOT_MEASURED, NeuroBenchError, compare, run_neurobench
    from tmkt.runtime.profile_report import neurobench_table
    from tmkt.runtime.profiler import profile_batches

    try:
        with console.status("running NeuroBench's harness"):
            nb = run_neurobench(run.model, x, labels, batch_size=batch_size)
            nb_folded = run_neurobench(run.model, x, labels, batch_size=batch_size, batchnorm_folded=True)
            # NeuroBench counts pooled spikes as MACs: tmkt's "mac" mode is the like-for-like profile
            mac = prof if prof.pooled_inputs == "mac" else profile_batches(graph, batches(), pooled_inputs="mac")
            fold = prof if prof.pooled_inputs == "fold" else profile_batches(graph, batches(), pooled_inputs="fold")
    except NeuroBenchError as e:
        fail(str(e))
    rows = compare(nb, mac, fold, graph, run.model, nb_folded)
    console.print(neurobench_table(rows))
    # the trained network may differ by a few spikes (counted in its notes); the folded one may not
    differ = [r.metric for r in rows if r.equal is False and r.metric.endswith("[BN folded]")]
    if differ:
        console.print(f"NeuroBench and tmkt disagree on: {', '.join(differ)}", markup=False, highlight=False)
    return {
        "version": version("neurobench"),
        "results": nb,
        "results_batchnorm_folded": nb_folded,
        "not_measured": dict(NOT_MEASURED),
        "tmkt_mac_totals": mac.totals(),
        "comparison": [r.to_dict() for r in rows],
    }


def profile(
    run_dir: Path = typer.Argument(..., help="Run directory (model.safetensors + config.json)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Data set to draw test samples from (default: the run's)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder of the data set's recordings (real sets)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Frame cache of the data set (default ~/.cache/tmkt)."),
    frames: Optional[Path] = typer.Option(
        None, "--frames", help="Profile these binned samples instead: .npy [N,T,C,H,W] or .npz with 'frames' (+ 'labels')."
    ),
    samples: int = typer.Option(64, "--samples", min=1, help="Number of samples (evenly spaced over the test split)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Samples per batch."),
    energy: bool = typer.Option(False, "--energy", help="Estimate energy per hardware profile."),
    hw: Optional[str] = typer.Option(
        None,
        "--hw",
        help="Comma-separated profile names (e.g. loihi,spinnaker2,gpu; list: docs/hw-profiles.md) or .toml paths "
        "(default: every built-in); implies --energy.",
    ),
    pooled_inputs: str = typer.Option(
        "fold", "--pooled-inputs", help="Pooled spikes: 'fold' (pool folded into the next layer, ACs) or 'mac'."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the profile as JSON (keys: docs/hw-profiles.md)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of firing rates and energy shares."),
    neurobench: bool = typer.Option(
        False,
        "--neurobench",
        help="Also run NeuroBench 2.3's harness (pip install 'tmkt[neurobench]') on the same samples and report its "
        "metrics beside tmkt's (docs/hw-profiles.md).",
    ),
) -> None:
    """Spikes, firing rates, activation sparsity and synaptic operations per layer on real samples,
    and with --energy the energy per inference on each hardware profile beside a dense ANN."""
    import numpy as np
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tmkt.checkpoint import load_run
    from tmkt.errors import TmktError
    from tmkt.export.graph import GraphError, lower_run
    from tmkt.hw_profiles import HwProfileError, load_profiles
    from tmkt.runtime.energy import estimate_energy
    from tmkt.runtime.profile_report import energy_table, layer_table, plot_profile, profile_dict, write_json
    from tmkt.runtime.profiler import POOLED_MODES, profile_batches

    console = Console()
    if pooled_inputs not in POOLED_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(POOLED_MODES)}", param_hint="--pooled-inputs")
    if plot is not None and plot.suffix.lower() != ".png":
        raise typer.BadParameter("the plot is written as PNG: give a .png path", param_hint="--plot")
    for opt, path in (("--json", json_out), ("--plot", plot)):
        if path is not None and path.is_dir():  # checked now, not after minutes of profiling
            raise typer.BadParameter(f"{path} is a folder; give the output file's path", param_hint=opt)
    if hw is not None and not any(part.strip() for part in hw.split(",")):
        raise typer.BadParameter("names no profile", param_hint="--hw")
    profiles = []
    if energy or hw is not None:
        try:
            profiles = load_profiles(hw)
        except HwProfileError as e:
            fail(f"--hw: {e}")
    try:
        run = load_run(run_dir)
        graph = lower_run(run)
    except TmktError as e:
        fail(str(e))

    if frames is not None:
        x, labels = _frames_file(frames, samples)
        source = {"frames": str(frames)}
    else:
        name = dataset or run.data["name"]
        x, labels = _dataset_frames(run, name, data_root, cache_dir, samples, console)
        source = {"dataset": name}
    if tuple(x.shape[2:]) != graph.input_shape:
        fail(f"samples have shape {tuple(x.shape[1:])} per sample; the model takes [T, {', '.join(map(str, graph.input_shape))}]")

    def batches():
        for i in range(0, len(x), batch_size):
            fr = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size].swapaxes(0, 1)))
            yield fr, None if labels is None else torch.from_numpy(labels[i : i + batch_size])

    columns = (TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("profile", total=len(x))
        try:
            prof = profile_batches(graph, batches(), pooled_inputs=pooled_inputs, on_batch=lambda n: bar.advance(task, n))
        except GraphError as e:
            fail(str(e))
    estimates = [estimate_energy(prof, p) for p in profiles]
    nb_doc = _neurobench(run, graph, x, labels, prof, batches, batch_size, console) if neurobench else None

    console.print(layer_table(prof, title=f"{run_dir} — {prof.samples} samples, T={prof.timesteps}, per inference"))
    if prof.accuracy is not None:
        console.print(f"accuracy on these samples: {prof.accuracy:.4f}")
    if estimates:
        console.print(energy_table(estimates))
        notes = ["ANN/SNN > 1: the SNN uses less energy; ANN = dense MACs of one pass, or of T passes."]
        if any(e.hw.unverified for e in estimates):
            notes.append("* numbers not verified against their primary source (see the profile's [sources]).")
        if any(not e.hw.event_driven for e in estimates):
            notes.append("(dense): the device computes every connection every step, spikes or not.")
        for e in estimates:
            if e.uncosted_macs:
                notes.append(f"† {e.hw.name}: {e.uncosted_macs:.3g} MACs on non-binary inputs not costed (no e_mac_pj).")
        console.print("\n".join(notes), markup=False, highlight=False)
    meta = {"run": str(run_dir), **source, "backbone": graph.meta.get("backbone"), "method": graph.meta.get("method")}
    doc = profile_dict(prof, estimates, meta)
    if nb_doc is not None:
        doc["neurobench"] = nb_doc
    for out, write in ((json_out, lambda p: write_json(p, doc)), (plot, lambda p: plot_profile(prof, estimates, p))):
        if out is None:
            continue
        try:
            write(out)  # the JSON goes through tmkt.fileio: a failure is one WriteError naming the file
        except TmktError as e:
            fail(str(e))
        except OSError as e:
            fail(f"{out}: cannot write ({e.strerror or e})")
        console.print(f"wrote {out}")
