"""`tmkt train` and `tmkt eval`: thin typed commands over `tmkt.train.trainer` and `tmkt.train.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tmkt.commands import fail

_SETTINGS = "Settings (override --config)"
NETX_SUFFIXES = (".net", ".h5", ".hdf5")


def _parse_input_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        sides = [int(p) for p in parts if p.strip()]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise typer.BadParameter(f"expected H, HxW or H,W with positive integers, got {text!r}", param_hint="--input-size")
    return (sides[0], sides[1])


def _passive_openmp() -> None:
    """OpenMP's threads sleep while they wait instead of spinning (unless the user set a policy):
    beside another busy process, spinning threads steal the cores the working ones need."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _parse_options(items: Optional[list[str]]) -> Optional[dict]:
    """`KEY=VALUE` pairs; values are read as YAML scalars (numbers, true/false, strings)."""
    if not items:
        return None
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        out[key.strip()] = yaml.safe_load(value)
    return out


def train_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of settings (keys as in TrainConfig)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory exactly where it stopped (its own settings)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Allow --out to name a folder that already holds a run (its files are replaced)."
    ),
    dataset: Optional[str] = typer.Option(
        None, help="digits (built in) | ncaltech101 | cifar10dvs | nmnist | dvsgesture.", rich_help_panel=_SETTINGS
    ),
    data_root: Optional[str] = typer.Option(None, help="Folder of the event recordings.", rich_help_panel=_SETTINGS),
    static_root: Optional[str] = typer.Option(None, help="Folder of the static images.", rich_help_panel=_SETTINGS),
    event_fraction: Optional[float] = typer.Option(
        None, help="Share of the event training set kept per class, in (0, 1].", rich_help_panel=_SETTINGS
    ),
    option: Optional[list[str]] = typer.Option(
        None, "--option", "-o", help="Data set option KEY=VALUE (repeatable), e.g. -o noise_rate=2.", rich_help_panel=_SETTINGS
    ),
    cache_dir: Optional[str] = typer.Option(None, help="Frame cache folder (default ~/.cache/tmkt).", rich_help_panel=_SETTINGS),
    timesteps: Optional[int] = typer.Option(None, "--timesteps", "-T", help="Frames per sample T.", rich_help_panel=_SETTINGS),
    input_size: Optional[str] = typer.Option(None, help="Network input H or HxW, e.g. 48 or 48x48.", rich_help_panel=_SETTINGS),
    backbone: Optional[str] = typer.Option(None, help="small | vgg | resnet18.", rich_help_panel=_SETTINGS),
    width: Optional[float] = typer.Option(None, help="Channel width multiplier.", rich_help_panel=_SETTINGS),
    tau: Optional[float] = typer.Option(None, help="LIF time constant.", rich_help_panel=_SETTINGS),
    v_threshold: Optional[float] = typer.Option(None, help="LIF threshold.", rich_help_panel=_SETTINGS),
    method: Optional[str] = typer.Option(None, help="tmkt | ekt | finetune | dvs.", rich_help_panel=_SETTINGS),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Method preset: 'paper' is the TMKT paper's exact design (separate classifier for the "
        "mixed stream, BN statistics from both streams; docs/method.md). --method still picks the method.",
        rich_help_panel=_SETTINGS,
    ),
    epochs: Optional[int] = typer.Option(None, help="Training epochs.", rich_help_panel=_SETTINGS),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size.", rich_help_panel=_SETTINGS),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default per data set; paper: 5e-3*batch/1024).", rich_help_panel=_SETTINGS),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay.", rich_help_panel=_SETTINGS),
    warmup_epochs: Optional[float] = typer.Option(None, help="Linear warm-up epochs.", rich_help_panel=_SETTINGS),
    min_lr: Optional[float] = typer.Option(None, help="Final learning rate of the cosine.", rich_help_panel=_SETTINGS),
    seed: Optional[int] = typer.Option(None, help="Seed of everything random.", rich_help_panel=_SETTINGS),
    out: Optional[str] = typer.Option(None, help="Run directory (default runs/<timestamp>-<method>).", rich_help_panel=_SETTINGS),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda.", rich_help_panel=_SETTINGS),
    num_workers: Optional[int] = typer.Option(
        None, help="DataLoader worker processes (default: 0 on CPU, up to 4 per process on CUDA).", rich_help_panel=_SETTINGS
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default: OMP_NUM_THREADS if set, else one per usable CPU, "
        "with OpenMP's passive wait policy so that a busy machine slows training gracefully; docs/robustness.md; "
        "--resume keeps the run's count). Results are bitwise reproducible for one thread count.",
        rich_help_panel=_SETTINGS,
    ),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bfloat16 autocast on CUDA.", rich_help_panel=_SETTINGS),
    channels_last: Optional[bool] = typer.Option(
        None, "--channels-last/--no-channels-last", help="Channels-last memory format on CUDA.", rich_help_panel=_SETTINGS
    ),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the forward passes and losses as one graph (first step compiles for minutes; for long GPU runs).", rich_help_panel=_SETTINGS),
    eval_every: Optional[int] = typer.Option(None, help="Validate every N epochs.", rich_help_panel=_SETTINGS),
    eval_batch_size: Optional[int] = typer.Option(
        None, help="Batch size for validation and test (default: 2 x batch size).", rich_help_panel=_SETTINGS
    ),
) -> None:
    """Train a spiking network (with no arguments: on the built-in digits set, a few minutes on a CPU).

    The default method is the best measured transfer on the built-in sets in the scarce-event
    regime: EKT's whole-sequence replacement with one classifier shared by the static and event
    streams (docs/results-methods.md). --preset paper trains the TMKT paper's design.

    Settings come from the defaults, the data set's preset, --config FILE.yaml and then the flags.
    Presets: digits T=8, 32x32, small backbone, 10 epochs, batch 32, lr 5e-3;
    ncaltech101 / cifar10dvs T=10, 48x48, vgg, 300 epochs, batch 120, lr 5e-3*batch/1024 (the paper's).
    Ctrl-C saves the run (exit 130); continue it with --resume RUN_DIR. Under
    `torchrun --nproc-per-node N -m tmkt train ...` it trains data-parallel.
    """
    _passive_openmp()  # before torch is imported: OpenMP reads it when its thread pool starts
    from rich.console import Console

    from tmkt.errors import TmktError
    from tmkt.train.config import build_config
    from tmkt.train.errors import TrainingError, TrainingInterrupted
    from tmkt.train.setup import resume_config
    from tmkt.train.trainer import train

    flags = {
        "dataset": dataset, "data_root": data_root, "static_root": static_root, "event_fraction": event_fraction,
        "data_options": _parse_options(option), "cache_dir": cache_dir, "timesteps": timesteps,
        "input_size": _parse_input_size(input_size), "backbone": backbone, "width": width, "method": method,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs, "min_lr": min_lr, "seed": seed, "out": out, "device": device,
        "num_workers": num_workers, "threads": threads, "amp": amp, "channels_last": channels_last, "compile": compile,
        "eval_every": eval_every, "eval_batch_size": eval_batch_size,
    }
    if preset is not None:
        from tmkt.train.method import METHOD_PRESETS

        if preset not in METHOD_PRESETS:
            raise typer.BadParameter(f"choose one of {', '.join(METHOD_PRESETS)}", param_hint="--preset")
        flags["method"] = {**METHOD_PRESETS[preset], **({"name": method} if method else {})}
    neuron = {k: v for k, v in (("tau", tau), ("v_threshold", v_threshold)) if v is not None}
    if neuron:
        flags["neuron"] = neuron
    console = Console()
    if flags["threads"] is None and resume is None:  # a resumed run keeps its stored count: bitwise the same steps
        from tmkt.train.setup import default_cpu_threads

        flags["threads"] = default_cpu_threads()
    try:
        if resume is not None:
            if config is not None:
                raise TrainingError("--resume takes the run's stored settings; drop --config")
            cfg = resume_config(resume, flags)
        else:
            cfg = build_config(config, flags)
        if cfg.out is not None and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            raise TrainingError(f"--out {cfg.out} is a file; the run directory must be a folder")
        result = train(cfg, console=console, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as e:
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.secho("interrupted (files already in the run directory stay valid: every write is atomic)", err=True)
        raise typer.Exit(130) from None
    except (TmktError, OSError) as e:  # OSError: e.g. --out is a file
        fail(str(e))
    else:
        import os

        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
            typer.echo(f"run directory: {result.run_dir}")
            typer.echo(f"test accuracy: {result.metrics['test_accuracy']:.4f}")


def eval_command(
    run: Path = typer.Argument(..., help="Run directory, a Loihi netx export file (.net, .h5, .hdf5) or an ONNX export "
                               "(.onnx, float or --int8: its accuracy beside the float model's)."),
    split: str = typer.Option("test", help="test | val."),
    dataset: Optional[str] = typer.Option(None, help="Data set name (default: the run's)."),
    data_root: Optional[str] = typer.Option(None, help="Folder of the event recordings (default: the run's)."),
    event_fraction: Optional[float] = typer.Option(None, help="Event training share (affects no test split; default: the run's)."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="Data set option KEY=VALUE (default: the run's)."),
    cache_dir: Optional[str] = typer.Option(None, help="Frame cache folder."),
    weights: str = typer.Option("model.safetensors", help="Weights file in the run: model.safetensors (best) or last.safetensors."),
    batch_size: int = typer.Option(64, min=1, help="Evaluation batch size."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    per_class: bool = typer.Option(False, "--per-class", help="Also print accuracy per class."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    exits: bool = typer.Option(False, "--exits", help="Every exit in one table: float, ONNX, netx (chip readout), int8 "
                               "ONNX and NIR in norse, snntorch and sinabs on the same split, with agreement to float."),
    lava: int = typer.Option(0, "--lava", min=0, help="netx file only: also run the first N test samples through "
                             "lava-dl itself and compare its readout argmax with the simulator's, sample for sample."),
) -> None:
    """Accuracy of a trained run's event head on its data set (rebuilt from the run's config or the flags)."""
    from tmkt.errors import TmktError

    if split not in ("test", "val"):
        raise typer.BadParameter(f"must be test or val, got {split!r}", param_hint="--split")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}", param_hint="--device")
    options = _parse_options(option)
    if exits:
        _print_exits(_eval_exits(run, split, cache_dir), as_json)
        return
    if run.suffix.lower() in NETX_SUFFIXES and run.is_file():  # `tmkt export --target lava` writes model.netx.h5
        _print_netx(_eval_netx(run, split, dataset, data_root, options, cache_dir, batch_size, lava), as_json)
        return
    if run.suffix.lower() == ".onnx" and run.is_file():  # float or int8 (`tmkt export --int8`)
        _print_onnx(_eval_onnx(run, split, cache_dir, batch_size), as_json)
        return
    from tmkt.train.setup import resolve_device

    try:
        dev = resolve_device(device)
        result = _eval_run(run, split, dataset, data_root, event_fraction, options, cache_dir, weights, batch_size, dev)
    except (TmktError, OSError) as e:
        fail(str(e))
    _print_result(result, per_class, as_json)


def _eval_run(run, split, dataset, data_root, event_fraction, options, cache_dir, weights, batch_size, device) -> dict:
    from tmkt.checkpoint import load_run
    from tmkt.data.registry import build_data_for_run
    from tmkt.errors import TmktError
    from tmkt.train.evaluate import evaluate

    loaded = load_run(run, weights_name=weights)
    name = dataset or loaded.data["name"]
    try:
        bundle = build_data_for_run(
            loaded.config, dataset=name, data_root=data_root, cache_dir=cache_dir, options=options,
            event_fraction=event_fraction,
        )
    except ValueError as e:  # the data package reports a bad name, option or folder as ValueError
        raise TmktError(str(e)) from e
    if list(bundle.spec.class_names) != loaded.class_names:
        raise TmktError(
            f"data set {name!r} has classes {list(bundle.spec.class_names)[:5]}..., the run was trained on "
            f"{loaded.class_names[:5]}...; they must match"
        )
    model = loaded.model.to(device)
    result = evaluate(model, getattr(bundle, split), batch_size, device, loaded.class_names)
    result.update({"run": str(run), "weights": weights, "split": split, "dataset": name})
    reported = loaded.config.get("metrics", {}).get("test_accuracy")
    if reported is not None and split == "test" and weights == "model.safetensors":
        result["reported_test_accuracy"] = reported
    return result


def _eval_netx(path: Path, split, dataset, data_root, options, cache_dir, batch_size, lava: int = 0) -> dict:
    from tmkt.errors import TmktError

    try:
        from tmkt.runtime.loihi_sim import evaluate_netx
    except ModuleNotFoundError as e:  # h5py: an optional part of an install
        fail(f"evaluating a netx export is not available in this install ({e})")
    try:
        return evaluate_netx(
            path, dataset, split, data_root=data_root, options=options, cache_dir=cache_dir, batch_size=batch_size,
            lava_samples=lava,
        )
    except (TmktError, OSError) as e:
        fail(str(e) if str(e).startswith(str(path)) else f"{path}: {e}")


def _eval_onnx(path: Path, split: str, cache_dir, batch_size: int) -> dict:
    from tmkt.errors import TmktError
    from tmkt.runtime.onnx_eval import evaluate_onnx

    try:
        return evaluate_onnx(path, split, cache_dir=cache_dir, batch_size=batch_size)
    except (TmktError, OSError) as e:
        fail(str(e) if str(e).startswith(str(path)) else f"{path}: {e}")


def _print_onnx(result: dict, as_json: bool) -> None:
    """An ONNX file's accuracy (onnxruntime) beside its float model's."""
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    binary = result.get("float_binary_accuracy")
    same = "" if binary is None else f"  float on the same binary input: {binary:.4f}"
    typer.echo(
        f"{result['split']} accuracy ({result['precision']} ONNX, {result['mode']}, onnxruntime): {result['accuracy']:.4f}  "
        f"float model: {result['float_accuracy']:.4f}{same}  agreement: {result['agreement']:.4f}  "
        f"({result['samples']} samples)"
    )


def _eval_exits(run: Path, split: str, cache_dir) -> dict:
    from tmkt.errors import TmktError
    from tmkt.runtime.exits import evaluate_exits

    if run.is_file():  # an exported file: the run it came from
        from tmkt.export.netx import read_meta

        try:
            run = Path(read_meta(run)["source_run"])
        except (KeyError, OSError, TmktError) as e:
            fail(f"{run}: cannot find the run this file was exported from ({e}); pass the run directory")
    try:
        return evaluate_exits(run, split=split, cache_dir=cache_dir)
    except (TmktError, OSError) as e:
        fail(str(e))


def _print_exits(result: dict, as_json: bool) -> None:
    """One row per exit: accuracy and agreement with the float model on the same samples."""
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("exit", "accuracy", "agreement with float", "notes",
                  title=f"{result['run']}: {result['split']} split, {result['samples']} samples")
    for row in result["rows"]:
        if "error" in row:
            table.add_row(row["exit"], "-", "-", row["error"][:80])
            continue
        notes = []
        if "readout_in_range" in row:
            notes.append(f"readout in range {row['readout_in_range']:.1%}")
        if "chip_agreement" in row:
            notes.append(f"agrees with the chip readout on {row['chip_agreement']:.1%}")
        if "spikes_identical" in row:
            notes.append("spikes identical" if row["spikes_identical"]
                         else f"{row['spike_differences']} of {row['spikes']} spikes differ")
            notes.append(f"max |dlogit| {row['max_abs_logit_diff']:.2g}")
        table.add_row(row["exit"], f"{row['accuracy']:.4f}", f"{row['agreement_with_float']:.4f}", ", ".join(notes))
    Console().print(table)


def _print_netx(result: dict, as_json: bool) -> None:
    """The bit-accurate simulator's accuracy of a netx file, beside its float model's."""
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return

    def pct(key: str) -> str:
        v = result.get(key)
        return "-" if v is None else f"{v:.4f}"

    typer.echo(
        f"{result.get('split', 'test')} accuracy (netx, chip readout, bit-accurate simulator): {pct('quantized_accuracy')}  "
        f"float model: {pct('float_accuracy')}  on binary input: {pct('float_binary_accuracy')}  agreement: "
        f"{pct('agreement')}  readout in range: {pct('readout_in_range')}  ({result.get('samples', '?')} samples)"
    )
    if "lava" in result:
        lava = result["lava"]
        typer.echo(f"lava-dl on {lava['samples']} test samples: readout argmax = simulator's on {lava['agree']}, "
                   f"membranes {'identical' if lava['identical_membrane'] else 'DIFFERENT'}")


def _print_result(result: dict, per_class: bool, as_json: bool) -> None:
    if as_json:
        shown = dict(result)
        if not per_class:
            shown.pop("per_class", None)
            shown.pop("confusion", None)
        typer.echo(json.dumps(shown, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{result.get('split', 'test')} accuracy: [bold]{result['accuracy']:.4f}[/] "
        f"({result.get('correct', '?')}/{result.get('total', '?')})"
    )
    if per_class and "per_class" in result:
        table = Table("class", "accuracy", "correct", "total")
        for name, row in result["per_class"].items():
            acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
            table.add_row(name, acc, str(row["correct"]), str(row["total"]))
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
