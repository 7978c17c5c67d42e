"""tmkt's NIR files in norse, snntorch and sinabs, through each framework's own NIR import.

`scripts/nir_run.py` loads a file with the framework's importer and steps it over the given frames,
recording the graph output at every step and every LIF node's spikes (forward hooks on the
framework's own modules). It runs in a subprocess: norse and snntorch in this Python (the main
env has both, with nir 1.0.8), sinabs in a light env of its own (`scripts/nir_env.sh sinabs`,
cached in ~/.cache/tmkt/nir-sinabs: sinabs 3.1.3 pins nir <= 1.0.4) and on the file
`export_nir(..., flavor="sinabs")` writes. `compare_framework` sets its outputs beside the deploy
graph's on the same frames. What each importer assumes and the differences measured: docs/nir.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from tmkt.errors import TmktError
from tmkt.export.graph import DeployGraph, run_graph
from tmkt.export.nir import DT
from tmkt.runtime.envs import CACHE_ROOT, cached_python, checkout_script, run_npz

FRAMEWORKS = ("norse", "snntorch", "sinabs")
FLAVOR = {"norse": "default", "snntorch": "default", "sinabs": "sinabs"}  # which file each one reads
LIGHT_ENVS = ("sinabs",)  # frameworks whose nir pin conflicts with the main env


class NirFrameworkError(TmktError, RuntimeError):
    """A framework's environment is missing or its NIR import failed on a tmkt file."""


def framework_python(framework: str, build: bool = True) -> Path:
    """The Python that runs `framework`: this one, or its light env (built when absent)."""
    if framework not in FRAMEWORKS:
        raise NirFrameworkError(f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")
    if framework not in LIGHT_ENVS:
        return Path(sys.executable)
    env = CACHE_ROOT / f"nir-{framework}"
    return cached_python(env, ".tmkt-nir-stamp", "nir_env.sh", [framework, str(env)], build=build,
                         error=NirFrameworkError, what=framework)


def run_framework(framework: str, path: str | Path, frames: np.ndarray, *, dt: float = DT,
                  timeout: float = 1800.0) -> dict[str, Any]:
    """Run NIR file `path` in `framework` on `frames` `[T, B, C, H, W]`.

    Returns {"step_logits": `[T, B, K]`, "spikes": {lif node: `[T, B, ...]`}, "seconds"}.
    """
    py = framework_python(framework)
    runner = checkout_script("nir_run.py", NirFrameworkError, "running other frameworks")
    out, seconds = run_npz(py, runner, [framework, str(path)],
                           {"frames": np.asarray(frames, np.float32), "dt": np.float64(dt)},
                           timeout=timeout, error=NirFrameworkError, what=f"{framework} on {path}")
    spikes = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("spikes/")}
    return {"step_logits": out["step_logits"], "spikes": spikes, "seconds": seconds}


def compare_framework(graph: DeployGraph, framework: str, path: str | Path, frames: np.ndarray,
                      labels: np.ndarray | None = None) -> dict[str, Any]:
    """`framework` on NIR file `path` beside the deploy graph on the same `frames` `[T, B, C, H, W]`.

    Returns {"framework", "samples", "spikes_identical", "spike_differences" {lif: count},
    "spikes" {lif: tmkt's count}, "max_abs_logit_diff", "prediction_agreement" (argmax of the mean
    over T of the output, as tmkt's logits), "accuracy" and "tmkt_accuracy" (with `labels`)}.
    """
    import torch

    ours = run_graph(graph, torch.from_numpy(np.asarray(frames, np.float32)))
    theirs = run_framework(framework, path, frames)
    ref_logits = ours["step_logits"].numpy()
    logits = theirs["step_logits"].reshape(ref_logits.shape)
    diffs, counts = {}, {}
    for name, ref in ours["spikes"].items():
        ref = ref.numpy()
        counts[name] = int(ref.sum())
        got = theirs["spikes"].get(name)
        diffs[name] = int(np.abs(got.reshape(ref.shape) - ref).sum()) if got is not None and got.size == ref.size else -1
    pred, ref_pred = logits.mean(0).argmax(1), ref_logits.mean(0).argmax(1)
    out = {
        "framework": framework, "samples": int(ref_logits.shape[1]),
        "spikes_identical": all(d == 0 for d in diffs.values()), "spike_differences": diffs, "spikes": counts,
        "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
        "prediction_agreement": float((pred == ref_pred).mean()), "seconds": theirs["seconds"],
    }
    if labels is not None:
        out["accuracy"] = float((pred == labels).mean())
        out["tmkt_accuracy"] = float((ref_pred == labels).mean())
    return out
