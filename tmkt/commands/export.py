"""`tmkt export RUN_DIR --target onnx|lava|nir [--int8]`: write a trained run as a deployable artefact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tmkt.commands import fail

TARGETS = ("onnx", "lava", "nir")


def _calibration(run, what: str):
    """The netx export's calibration spikes (both integer exits use the same), with progress on
    stderr: reading the samples and the quantization that follows take minutes for a VGG-SNN."""
    import time

    from tmkt.export.netx import calibration_from_run

    start = time.perf_counter()
    typer.echo("reading calibration samples from the run's training set ...", err=True)
    spikes = calibration_from_run(run)
    typer.echo(f"{spikes.shape[1]} calibration samples ({time.perf_counter() - start:.0f} s); quantizing, writing the "
               f"{what} and checking it against the Loihi simulator ...", err=True)
    return spikes


def _export_to(target: str, run, graph, dest: Path, verify: bool, run_dir: Path, mode: str,
               timesteps: Optional[int], opset: Optional[int], nir_flavor: str = "default", int8: bool = False):
    """Call the one export function of `target`; returns its ExportReport."""
    if target == "onnx" and int8:
        from tmkt.export.onnx_int8 import export_onnx_int8

        # the netx export's calibration: both files carry the same integers
        return export_onnx_int8(graph, dest, verify=verify, mode=mode, timesteps=timesteps,
                                calibration=_calibration(run, "int8 model"), source_run=run_dir)
    if target == "onnx":
        from tmkt.export.onnx import DEFAULT_OPSET, export_onnx

        return export_onnx(graph, dest, verify=verify, mode=mode, timesteps=timesteps, opset=opset or DEFAULT_OPSET)
    if target == "lava":
        from tmkt.export.netx import export_netx
        from tmkt.runtime.lava import lava_check

        return export_netx(graph, dest, verify=verify, source_run=run_dir, lava_check=lava_check() if verify else None,
                           calibration=_calibration(run, "netx file"))
    from tmkt.export.nir import export_nir

    return export_nir(graph, dest, verify=verify, flavor=nir_flavor)


def export(
    run_dir: Path = typer.Argument(..., help="Run directory (config.json + model.safetensors)."),
    target: str = typer.Option("onnx", "--target", "-t", help="onnx | lava (netx HDF5) | nir."),
    mode: str = typer.Option("unrolled", "--mode", help="ONNX only: unrolled (T steps) | stream (one step + state)."),
    timesteps: Optional[int] = typer.Option(None, "--timesteps", "-T", help="ONNX only: T (default: the run's)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX only: opset version, 13..20 (default 17)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output file (default: RUN_DIR/model.<mode>.onnx, model.<mode>.int8.onnx, "
        "model.netx.h5 or model.nir)."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="ONNX only: the Loihi export's 8-bit integer network (same weights, scales and "
        "thresholds) as integer onnxruntime ops; input spikes = frame > 0.5; checked spike for spike against the "
        "Loihi simulator (docs/int8.md)."),
    nir_flavor: str = typer.Option(
        "default", "--nir-flavor", help="NIR only: default (norse with from_nir(g, dt=1e-4), snntorch, nir >= 1.0.5) | "
        "sinabs (sinabs 3.1.3 and nir 1.0.4 read it; docs/nir.md)."),
    no_verify: bool = typer.Option(
        False,
        "--no-verify",
        help="Skip the check: onnx/nir outputs against the PyTorch model; lava: lava-dl against the bit-accurate "
        "simulator (builds a Python 3.10 lava env in ~/.cache/tmkt/lava-env on first use).",
    ),
) -> None:
    """Export a run to ONNX, Loihi lava-dl netx or NIR, checked against PyTorch unless --no-verify."""
    if target not in TARGETS:
        raise typer.BadParameter(f"must be one of {', '.join(TARGETS)}", param_hint="--target")
    if mode not in ("unrolled", "stream"):
        raise typer.BadParameter("must be unrolled or stream", param_hint="--mode")
    if timesteps is not None and timesteps < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--timesteps")
    if target != "onnx" and (mode != "unrolled" or timesteps is not None or opset is not None or int8):
        raise typer.BadParameter("--mode, --timesteps, --opset and --int8 apply to --target onnx only")
    if int8 and opset is not None:
        raise typer.BadParameter("--int8 models are written at opset 17; drop --opset", param_hint="--opset")
    if nir_flavor not in ("default", "sinabs"):
        raise typer.BadParameter("must be default or sinabs", param_hint="--nir-flavor")
    if target != "nir" and nir_flavor != "default":
        raise typer.BadParameter("--nir-flavor applies to --target nir only")
    if out is not None and out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give the output file's path", param_hint="--out")

    from tmkt.checkpoint import load_run
    from tmkt.errors import TmktError
    from tmkt.export.graph import lower_run

    onnx_name = f"model.{mode}.int8.onnx" if int8 else f"model.{mode}.onnx"
    default_name = {"onnx": onnx_name, "lava": "model.netx.h5", "nir": "model.nir"}[target]
    try:
        run = load_run(run_dir)
        graph = lower_run(run)
        report = _export_to(target, run, graph, out or run_dir / default_name, not no_verify, run_dir, mode, timesteps, opset,
                            nir_flavor, int8)
    except ModuleNotFoundError as e:  # lava's and NIR's exporters need h5py / nir, optional parts of an install
        fail(f"target {target!r} is not available in this installation ({e})")
    except (TmktError, OSError) as e:
        fail(str(e))
    typer.echo(report.summary())


def register(app: typer.Typer) -> None:
    app.command("export")(export)
