"""Run a netx HDF5 file in lava-dl (fixed point) and save every layer's spikes.

Runs inside the Python 3.10 lava env (scripts/lava_env.sh), not in tmkt's env:

    python scripts/lava_run.py NET.net IN.npz OUT.npz

IN.npz:  spikes int [N, T, C, H, W] (binary), reset_interval (T).
OUT.npz: num_layers; layer{k} [steps, *shape] spikes of netx layer k (input = 0) in (C, H, W)
         order, steps = N*T + depth (back to back, then the pipeline drains);
         readout_v [steps, K] membrane of the last layer.

Light env, no torch: lava-dl 0.6.0's `lava.lib.dl.netx` package __init__ imports
`sequential_modules` (torch), and `netx/hdf5.py` imports `neuron_params` from
`lava.lib.dl.slayer.neuron.rf`, whose package imports torch everywhere. Before importing netx we
therefore register, in sys.modules only:
  1. `lava.lib.dl.netx` as a bare package pointing at its real directory, so its submodules
     (hdf5, blocks, utils: no torch) load without running its __init__, and
     `lava.lib.dl.netx.sequential_modules` (the torch-based PyTorch-side helper, never used here)
     as an empty module, because lava's compiler imports every module of a Process's package
     while it searches for process models;
  2. `lava.lib.dl.slayer.neuron.rf` as a module whose `neuron_params` raises: netx calls it
     only for resonate-and-fire neurons, which tmkt never writes.
Nothing else is replaced; the Network, blocks and every process model are lava's own.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np


def _light_netx() -> None:
    spec = importlib.util.find_spec("lava.lib.dl")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lava-dl is not installed in this Python")
    import lava.lib.dl as dl  # a namespace package: nothing runs

    root = Path(list(spec.submodule_search_locations)[0])
    netx = types.ModuleType("lava.lib.dl.netx")
    netx.__path__ = [str(root / "netx")]
    sys.modules["lava.lib.dl.netx"] = netx
    dl.netx = netx
    # lava's compiler imports every sibling module of a Process's module to find its models:
    # an empty stand-in (with its real file name, which the compiler inspects) for this one.
    seq = types.ModuleType("lava.lib.dl.netx.sequential_modules")
    seq.__file__ = str(root / "netx" / "sequential_modules.py")
    sys.modules[seq.__name__] = seq

    def neuron_params(*_args, **_kwargs):
        raise NotImplementedError("resonate-and-fire neurons need slayer (torch); not in the light lava env")

    for name in ("lava.lib.dl.slayer", "lava.lib.dl.slayer.neuron"):
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        sys.modules[name] = pkg
    rf = types.ModuleType("lava.lib.dl.slayer.neuron.rf")
    rf.neuron_params = neuron_params
    sys.modules["lava.lib.dl.slayer.neuron.rf"] = rf


def _to_chw(x: np.ndarray) -> np.ndarray:
    """lava (W, H, C, steps) or (N, steps) -> (steps, C, H, W) or (steps, N)."""
    if x.ndim == 4:
        return x.transpose(3, 2, 1, 0)
    return x.reshape(-1, x.shape[-1]).T


def main(net_path: str, in_path: str, out_path: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        _light_netx()
    from lava.lib.dl.netx import hdf5
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc import io
    from lava.proc.monitor.process import Monitor

    with np.load(in_path) as z:
        spikes = z["spikes"].astype(np.int32)  # [N, T, C, H, W]
        reset_interval = int(z["reset_interval"])
    n, t = spikes.shape[:2]
    net = hdf5.Network(net_config=net_path, reset_interval=reset_interval)
    depth = len(net.layers) - 1
    steps = n * t + depth
    seq = spikes.reshape(n * t, *spikes.shape[2:])  # back to back
    data = np.zeros((*seq.shape[1:][::-1], steps), np.int32)  # lava (W, H, C, steps)
    data[..., : n * t] = seq.transpose(3, 2, 1, 0)
    if tuple(data.shape[:-1]) != tuple(net.inp.shape):
        raise SystemExit(f"input shape {data.shape[:-1]} (W, H, C) does not match the network's {net.inp.shape}")
    source = io.source.RingBuffer(data=data)
    # net.inp only forwards to the input layer's neuron; connecting an outside process to the
    # Network's own port made lava-nc 0.10's compiler keep the hierarchical Input block as a
    # leaf ("No subcompiler exists for ... PyInputModel"), so feed the neuron directly
    source.s_out.connect(net.layers[0].neuron.a_in)
    sinks = []
    for layer in net.layers:
        # tap the leaf neuron process: a port of a hierarchical block seen from outside the
        # Network makes lava's compiler treat the block as a leaf
        sink = io.sink.RingBuffer(shape=layer.neuron.s_out.shape, buffer=steps)
        layer.neuron.s_out.connect(sink.a_in)
        sinks.append(sink)
    monitor = Monitor()
    readout = net.layers[-1].neuron
    monitor.probe(readout.v, steps)
    net.run(condition=RunSteps(num_steps=steps), run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
    out = {f"layer{k}": _to_chw(s.data.get()).astype(np.uint8) for k, s in enumerate(sinks)}
    v = monitor.get_data()[readout.name]["v"]  # [steps, K]
    net.stop()
    np.savez(out_path, num_layers=np.int64(len(sinks)), readout_v=np.asarray(v, np.int64).reshape(steps, -1), **out)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: lava_run.py NET.net IN.npz OUT.npz")
    main(*sys.argv[1:])
