"""Milliseconds per optimizer step on the paper's setting, against a plain per-time-step loop.

Setting: VGG-SNN, T=10, input 2x48x48, batch 120 per stream. Variants, all in one run on one device:

  loop-fp32 / loop-bf16   plain PyTorch: for t in range(T): conv -> BN2d -> LIF step (python), the
                          same VGG-SNN layers, cross-entropy on the mean logits, AdamW;
  sj-ce-fp32 / sj-ce-bf16 tmkt's spikingjelly multi-step model, events only, cross-entropy only;
  tmkt-fp32 / tmkt-bf16   tmkt's full TMKT step: both streams (mixed + event), TET on both,
                          CKA alignment, MAG and MRP, AdamW over model + method parameters;
  tmkt-bf16-compile       the same with the model under torch.compile (compile seconds reported).
bf16 runs use autocast and channels_last. Each figure is the median of timed steps after warm-up,
measured with CUDA events (or wall clock on CPU). Prints a table and writes JSON (--json).

    python bench/train_step.py                 # on a GPU
    python bench/train_step.py --small --steps 3   # smoke run on a CPU (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tmkt.models import ModelConfig, NeuronConfig, build_model  # noqa: E402
from tmkt.train.method import MethodConfig, build_method  # noqa: E402


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (x,) = ctx.saved_tensors
        alpha = 2.0  # ATan surrogate, as tmkt's default
        return g * (alpha / 2) / (1 + (torch.pi / 2 * alpha * x) ** 2)


class LoopVGG(nn.Module):
    """The VGG-SNN written as a plain per-time-step loop (the baseline)."""

    def __init__(self, classes: int, width: float, size: int, tau: float = 2.0, v_th: float = 1.0) -> None:
        super().__init__()
        plan = [(64, 128), (256, 256), (512, 512), (512, 512)]
        self.convs, self.bns, self.pool_after = nn.ModuleList(), nn.ModuleList(), []
        cin = 2
        for a, b in plan:
            for c in (a, b):
                c = max(1, int(c * width))
                self.convs.append(nn.Conv2d(cin, c, 3, padding=1, bias=False))
                self.bns.append(nn.BatchNorm2d(c))
                self.pool_after.append(c == max(1, int(b * width)) and len(self.convs) % 2 == 0)
                cin = c
        self.fc = nn.Linear(cin * (size // 16) ** 2, classes)
        self.tau, self.v_th = tau, v_th

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, B, C, H, W]
        vs = [None] * len(self.convs)
        outs = []
        for t in range(x.shape[0]):
            h = x[t]
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                cur = bn(conv(h))
                v = cur if vs[i] is None else vs[i] - vs[i] / self.tau + cur
                s = _Spike.apply(v - self.v_th)
                vs[i] = v * (1 - s.detach())
                h = F.avg_pool2d(s, 2) if self.pool_after[i] else s
            outs.append(self.fc(h.flatten(1)))
        return torch.stack(outs).mean(0)


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def bench(name, step, warmup, steps, device, results, extra=None):
    timer = _timer(device)
    t0 = time.perf_counter()
    timer(step)  # first call (compilation happens here for compiled variants)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = [timer(step) for _ in range(steps)]
    row = {"variant": name, "ms_per_step": statistics.median(times), "min_ms": min(times), "first_call_s": first_s}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    row.update(extra or {})
    results.append(row)
    print(f"{name:22s} {row['ms_per_step']:9.1f} ms/step  (min {row['min_ms']:.1f}, first call {first_s:.1f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=120)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--classes", type=int, default=101)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    width = 1.0
    if args.small:
        args.batch, args.timesteps, args.size, width = 4, 4, 32, 0.125
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    T, B, S = args.timesteps, args.batch, args.size
    static = torch.rand(B, T, 2, S, S, device=device)
    events = (torch.rand(B, T, 2, S, S, device=device) < 0.1).float() * 2
    labels = torch.randint(0, args.classes, (B,), device=device)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "batch_per_stream": B, "timesteps": T, "input": [2, S, S],
    }
    print(json.dumps(info), flush=True)
    results: list[dict] = []

    for prec in ("fp32", "bf16"):
        name = f"loop-{prec}"
        if name in skip:
            continue
        net = LoopVGG(args.classes, width, S).to(device)
        if prec == "bf16":
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        x_ev = events.transpose(0, 1).contiguous()

        def step(net=net, opt=opt, prec=prec, x_ev=x_ev):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = F.cross_entropy(net(x_ev).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        bench(name, step, args.warmup, args.steps, device, results)
        del net, opt

    for variant in ("sj-ce-fp32", "sj-ce-bf16", "tmkt-fp32", "tmkt-bf16", "tmkt-bf16-compile"):
        if variant in skip:
            continue
        bf16 = "bf16" in variant
        model = build_model(ModelConfig(backbone="vgg", num_classes=args.classes, input_size=(S, S), width=width,
                                        neuron=NeuronConfig(tau=2.0, v_threshold=1.0))).to(device)
        if bf16:
            model = model.to(memory_format=torch.channels_last)
        method = build_method(MethodConfig(name="tmkt"), T).to(device)
        opt = torch.optim.AdamW(list(model.parameters()) + list(method.parameters()), lr=1e-3)
        fwd_model = model
        if variant.endswith("compile"):
            model.trunk = torch.compile(model.trunk)
        gen = torch.Generator(device=device).manual_seed(0)

        if variant.startswith("sj-ce"):
            def step(model=model, opt=opt, bf16=bf16):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = model(events.transpose(0, 1), head="event")
                    loss = F.cross_entropy(out["logits"].float().mean(0), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            def step(model=fwd_model, method=method, opt=opt, bf16=bf16, gen=gen):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, _ = method(model, static, events, labels, 0.5, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        try:
            bench(variant, step, args.warmup, args.steps, device, results)
        except Exception as e:  # report and go on: one failing variant must not lose the others
            print(f"{variant:22s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append({"variant": variant, "error": f"{type(e).__name__}: {str(e)[:1000]}"})
        del model, method, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = {r["variant"]: r["ms_per_step"] for r in results if "ms_per_step" in r}
    print("\nratios against loop-bf16 (same run):")
    for r in results:
        if "ms_per_step" in r and "loop-bf16" in base:
            print(f"  {r['variant']:22s} {base['loop-bf16'] / r['ms_per_step']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
