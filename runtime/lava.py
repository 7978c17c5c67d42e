"""lava-dl itself: the Python 3.10 lava environment, running a netx file there, and the check
that lava-dl and the bit-accurate simulator (`tmkt.export.netx_sim`) agree spike for spike.

lava-nc / lava-dl need Python 3.10 and pull in torch; tmkt keeps them out of its own env. A light
env (lava-nc 0.10, lava-dl 0.6, no torch) is built once by `scripts/lava_env.sh` into
~/.cache/tmkt/lava-env, and `scripts/lava_run.py` runs a netx file there in a subprocess
(samples back to back, as `hdf5.Network(reset_interval=T)` expects). Both scripts ship with the
source checkout, not with a wheel: verifying against lava-dl needs a checkout.

lava's timeline is pipelined: layer k (input = 0) emits frame j of sample n at step n*T + j + k.
`to_lava_timeline` / `from_lava_timeline` convert between it and the simulator's aligned view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tmkt.export.netx import read_netx
from tmkt.export.netx_sim import simulate
from tmkt.export.quantize import LavaExportError
from tmkt.runtime.envs import CACHE_ROOT, cached_python, checkout_script, run_npz

DEFAULT_LAVA_ENV = CACHE_ROOT / "lava-env"


class LavaError(LavaExportError):
    """The lava environment is missing or failed, or lava-dl disagrees with the simulator."""


def lava_python(env_dir: str | Path | None = None, build: bool = True) -> Path:
    """Python of the lava env (default ~/.cache/tmkt/lava-env), built by scripts/lava_env.sh if absent."""
    env = Path(env_dir) if env_dir else DEFAULT_LAVA_ENV
    return cached_python(env, ".tmkt-lava-stamp", "lava_env.sh", [str(env)], build=build, error=LavaError, what="lava")


def run_in_lava(path: str | Path, spikes: np.ndarray, *, lava_env: str | Path | None = None,
                timeout: float = 600.0) -> dict[str, Any]:
    """Run netx file `path` in lava-dl (fixed_pt) on `spikes` `[N, T, C, H, W]`, samples back to back.

    Returns {"spikes": per layer (input first) aligned `[T, N, *shape]` uint8, "readout_v":
    `[N, K]` membrane of the readout after each sample's last frame, "seconds": wall time}.
    """
    py = lava_python(lava_env)
    runner = checkout_script("lava_run.py", LavaError, "lava verification")
    n, t = spikes.shape[:2]
    hint = (f": lava-dl runs every layer as its own process on the CPU, too slow here for {n} sample(s) of this "
            "network; use fewer samples, or skip the lava-dl check (tmkt export --no-verify)")
    out, seconds = run_npz(py, runner, [str(path)], {"spikes": np.asarray(spikes, np.int32), "reset_interval": np.int64(t)},
                           timeout=timeout, error=LavaError, what="lava-dl run", timeout_hint=hint)
    n_layers = int(out["num_layers"])
    timelines = [out[f"layer{k}"] for k in range(n_layers)]
    v_trace = out["readout_v"]
    aligned = [from_lava_timeline(tl, k, t, n) for k, tl in enumerate(timelines)]
    depth = n_layers - 1
    readout_v = np.stack([v_trace[i * t + t - 1 + depth] for i in range(n)])
    return {"spikes": aligned, "readout_v": readout_v, "seconds": seconds}


# lava-dl (fixed_pt, CPU) time per neuron and step, measured here: a VGG-SNN at half width, 48x48
# (465k neurons), ran 1 sample (19 pipelined steps) in 254 s, start-up included
LAVA_S_PER_NEURON_STEP = 2.9e-5
LAVA_CHECK_BUDGET_S = 300.0


def lava_estimate(net, samples: int, t: int) -> float:
    """Seconds lava-dl is expected to take for `samples` samples of `t` steps of `net`."""
    neurons = int(np.prod(net.input_shape)) + sum(int(np.prod(q.out_shape)) for q in net.layers)
    return (samples * t + len(net.layers)) * neurons * LAVA_S_PER_NEURON_STEP


def lava_samples(net, wanted: int, t: int, budget_s: float = LAVA_CHECK_BUDGET_S) -> int:
    """How many of `wanted` samples the export's lava-dl check runs: as many as fit `budget_s`
    by `lava_estimate`, at least 1 (a VGG-SNN at 48x48 gets 1; the built-in small model all 8)."""
    n = wanted
    while n > 1 and lava_estimate(net, n, t) > budget_s:
        n -= 1
    return n


def verify_with_lava(path: str | Path, spikes: np.ndarray, *, lava_env: str | Path | None = None,
                     budget_s: float | None = LAVA_CHECK_BUDGET_S) -> dict[str, Any]:
    """lava-dl vs the bit-accurate simulator on `spikes` `[N, T, C, H, W]`: every layer's spikes
    and the readout membrane must be identical; raises LavaError naming the first layer
    that differs. lava-dl is slow on large networks: with `budget_s`, only as many samples as
    `lava_samples` allows run (spread over the N, the first included), with a timeout of 3x
    their estimate (at least 10 min). Returns {"layers", "spikes", "samples", "lava_seconds"}."""
    net = read_netx(path)
    spikes = np.asarray(spikes)
    n, t = spikes.shape[:2]
    if budget_s is not None:
        keep = lava_samples(net, n, t, budget_s)
        spikes = spikes[np.linspace(0, n - 1, keep).round().astype(int)] if keep < n else spikes
    timeout = max(600.0, 3 * lava_estimate(net, spikes.shape[0], t))
    sim = simulate(net, spikes.transpose(1, 0, 2, 3, 4))
    lava = run_in_lava(path, spikes, lava_env=lava_env, timeout=timeout)
    names = ["input"] + [q.name for q in net.layers]
    if len(lava["spikes"]) != len(sim.spikes):
        raise LavaError(f"lava built {len(lava['spikes'])} layers, the simulator {len(sim.spikes)}")
    for name, a, b in zip(names, lava["spikes"], sim.spikes):
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = int((a != b).sum()) if a.shape == b.shape else -1
            raise LavaError(f"lava-dl and the simulator differ at layer {name!r} ({diff} spikes differ)")
    if not np.array_equal(lava["readout_v"], sim.readout_v[-1]):
        raise LavaError("lava-dl and the simulator differ in the readout membrane")
    return {"layers": len(names), "spikes": int(sum(int(s.sum()) for s in sim.spikes)), "samples": int(spikes.shape[0]),
            "lava_seconds": lava["seconds"]}


def lava_check(lava_env: str | Path | None = None):
    """A file check for `tmkt.export.netx.export_netx(lava_check=...)`: lava-dl must match the
    simulator spike for spike on the check's input; returns `verify_with_lava`'s figures."""

    def check(path: Path, spikes: np.ndarray) -> dict[str, Any]:
        return verify_with_lava(path, spikes, lava_env=lava_env)

    return check


# ---------------------------------------------------------------- lava's pipelined timeline


def to_lava_timeline(aligned: np.ndarray, layer_index: int, total_steps: int) -> np.ndarray:
    """Aligned `[T, N, ...]` of layer k -> lava's back-to-back timeline `[steps, ...]` (0-based:
    frame j of sample n at step n*T + j + k); steps outside any sample are zero."""
    t, n = aligned.shape[:2]
    out = np.zeros((total_steps, *aligned.shape[2:]), aligned.dtype)
    seq = aligned.transpose(1, 0, *range(2, aligned.ndim)).reshape(t * n, *aligned.shape[2:])
    out[layer_index:layer_index + t * n] = seq[: max(0, total_steps - layer_index)]
    return out


def from_lava_timeline(timeline: np.ndarray, layer_index: int, t: int, n: int) -> np.ndarray:
    """Inverse of `to_lava_timeline`: `[steps, ...]` -> aligned `[T, N, ...]`."""
    seq = timeline[layer_index:layer_index + t * n]
    return seq.reshape(n, t, *timeline.shape[1:]).transpose(1, 0, *range(2, timeline.ndim + 1))
