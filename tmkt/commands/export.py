"""`tmkt export RUN_DIR --target onnx|lava|nir`: write a trained run as a deployable artefact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tmkt.commands import fail

TARGETS = ("onnx", "lava", "nir")


def _target_function(target: str, name: str):
    """Import `tmkt.export.<target>.<name>` lazily: lava/NIR exporters are optional parts."""
    import importlib

    try:
        module = importlib.import_module(f"tmkt.export.{target}")
    except ImportError as e:
        fail(f"target {target!r} is not available in this installation (tmkt.export.{target}: {e})")
    fn = getattr(module, name, None)
    if fn is None:
        fail(f"target {target!r} is not available: tmkt.export.{target} has no {name}()")
    return fn


def _call(fn, *args, verify: bool):
    """Call an exporter, passing `verify` when it takes one."""
    import inspect

    if "verify" in inspect.signature(fn).parameters:
        return fn(*args, verify=verify)
    return fn(*args)


def _describe(result) -> str:
    """Exporters return a path, or a dict with `path` and their verification figures."""
    if isinstance(result, dict) and "path" in result:
        rest = ", ".join(f"{k}={v}" for k, v in result.items() if k != "path")
        return f"wrote {result['path']}" + (f" ({rest})" if rest else "")
    return f"wrote {result}"


def _lava_check(path) -> str:
    """The checks export_lava recorded in the file (simulator vs float graph, lava-dl), as ' (...)'."""
    try:
        from tmkt.export.lava import read_meta

        check = read_meta(path).get("check", {})
    except Exception:  # the file is written and valid; a missing summary is no error
        return ""
    parts = []
    if "float_agreement_random_input" in check:
        parts.append(f"simulator vs float on {check.get('samples', '?')} random inputs: "
                     f"{check['float_agreement_random_input']:.0%} agree")
    lava = check.get("lava")
    parts.append(f"lava-dl vs simulator: {'identical' if lava.get('identical') else 'differ'}" if lava else "lava-dl check skipped")
    return " (" + "; ".join(parts) + ")"


def export(
    run_dir: Path = typer.Argument(..., help="Run directory (config.json + model.safetensors)."),
    target: str = typer.Option("onnx", "--target", "-t", help="onnx | lava (netx HDF5) | nir."),
    mode: str = typer.Option("unrolled", "--mode", help="ONNX only: unrolled (T steps) | stream (one step + state)."),
    timesteps: Optional[int] = typer.Option(None, "--timesteps", "-T", help="ONNX only: T (default: the run's)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX only: opset version, 13..20 (default 17)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output file (default: RUN_DIR/model.<mode>.onnx, model.netx.h5 or model.nir)."
    ),
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
    if target != "onnx" and (mode != "unrolled" or timesteps is not None or opset is not None):
        raise typer.BadParameter("--mode, --timesteps and --opset apply to --target onnx only")
    if out is not None and out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give the output file's path", param_hint="--out")

    from tmkt.checkpoint import CheckpointError

    if target == "lava":
        fn = _target_function("lava", "export_lava")
        dest = out or Path(run_dir) / "model.netx.h5"
        try:
            result = fn(run_dir, dest, verify=not no_verify)
        except (CheckpointError, ValueError, OSError) as e:
            fail(str(e))
        typer.echo(_describe(result) + _lava_check(result))
        return

    from tmkt.checkpoint import load_run
    from tmkt.export.graph import lower_run

    try:
        graph = lower_run(load_run(run_dir))
    except (CheckpointError, ValueError) as e:  # GraphError is a ValueError
        fail(str(e))

    if target == "nir":
        fn = _target_function("nir", "export_nir")
        dest = out or Path(run_dir) / "model.nir"
        try:
            result = _call(fn, graph, dest, verify=not no_verify)
        except (ValueError, OSError) as e:
            fail(str(e))
        typer.echo(_describe(result))
        return

    from tmkt.export.onnx import DEFAULT_OPSET, export_onnx, verify_onnx

    dest = out or Path(run_dir) / f"model.{mode}.onnx"
    try:
        written = export_onnx(graph, dest, mode=mode, timesteps=timesteps, opset=opset or DEFAULT_OPSET, verify=False)
    except (ValueError, OSError) as e:
        fail(str(e))
    size_kib = written.stat().st_size / 1024
    typer.echo(f"wrote {written} ({mode}, T={timesteps or graph.meta['timesteps']}, {size_kib:.1f} KiB, onnx.checker: ok)")
    if no_verify:
        typer.echo("verification skipped (--no-verify)")
        return
    report = verify_onnx(graph, written)
    typer.echo(f"onnxruntime vs PyTorch: {report.summary()}")
    if not report.ok:
        written.unlink()
        fail(f"verification failed, {written} removed")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
