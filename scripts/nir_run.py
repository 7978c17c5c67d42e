"""Run a tmkt NIR file through another framework's own NIR import, step by step.

    python scripts/nir_run.py FRAMEWORK FILE.nir IN.npz OUT.npz       FRAMEWORK: norse | snntorch | sinabs

IN.npz: `frames` float32 [T, B, C, H, W], `dt` (seconds per step). OUT.npz: `step_logits`
[T, B, K] (the graph output at every step) and `spikes/<node>` [T, B, ...] for every LIF node
(captured with forward hooks on the framework's own modules). Runs in whatever Python has the
framework: the main env for norse and snntorch, ~/.cache/tmkt/nir-sinabs for sinabs (its nir pin).
Imports nothing from tmkt, so it runs in a light env.
"""

from __future__ import annotations

import sys

import nir
import numpy as np
import torch


def _hooks(model: torch.nn.Module, names: list[str], store: dict[str, list]) -> None:
    for name, module in model.named_modules():
        key = name.split(".")[-1]
        if key in names:
            def hook(_m, _inp, out, key=key):
                spk = out[0] if isinstance(out, tuple) else out
                if torch.is_tensor(spk):
                    store[key].append(spk.detach().clone())
            module.register_forward_hook(hook)


def run_norse(graph, frames: torch.Tensor, dt: float, lifs: list[str]):
    import norse.torch as nt

    model = nt.from_nir(graph, dt=dt)
    store = {n: [] for n in lifs}
    _hooks(model, lifs, store)
    state, outs = None, []
    for x in frames:
        out, state = model(x, state)
        outs.append(out)
    return torch.stack(outs), store


def run_snntorch(graph, frames: torch.Tensor, dt: float, lifs: list[str]):
    from snntorch.import_nir import import_from_nir

    model = import_from_nir(graph)  # dt is fixed at 1e-4 s inside snntorch
    store = {n: [] for n in lifs}
    _hooks(model, lifs, store)
    outs = [model(x) for x in frames]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return torch.stack(outs), store


def run_sinabs(graph, frames: torch.Tensor, dt: float, lifs: list[str]):
    import sinabs

    t, b = frames.shape[:2]
    model = sinabs.from_nir(graph, batch_size=b)
    store = {n: [] for n in lifs}
    _hooks(model, lifs, store)
    # sinabs layers take time folded into the batch: [B * T, ...], sample-major
    x = frames.transpose(0, 1).reshape(b * t, *frames.shape[2:])
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out  # nirtorch's executor also returns its state
    out = out.reshape(b, t, *out.shape[1:]).transpose(0, 1)
    store = {k: [v[0].reshape(b, t, *v[0].shape[1:]).transpose(0, 1)] if v else [] for k, v in store.items()}
    store = {k: list(v[0]) if v else [] for k, v in store.items()}
    return out, store


RUNNERS = {"norse": run_norse, "snntorch": run_snntorch, "sinabs": run_sinabs}


def main(framework: str, path: str, inp: str, outp: str) -> None:
    with np.load(inp) as z:
        frames, dt = torch.from_numpy(z["frames"].astype(np.float32)), float(z["dt"])
    graph = nir.read(path)
    lifs = [k for k, n in graph.nodes.items() if isinstance(n, nir.LIF)]
    torch.set_grad_enabled(False)
    logits, store = RUNNERS[framework](graph, frames, dt, lifs)
    out = {"step_logits": logits.reshape(logits.shape[0], logits.shape[1], -1).numpy()}
    for name, steps in store.items():
        if steps:
            out[f"spikes/{name}"] = torch.stack(steps).numpy()
    np.savez(outp, **out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
