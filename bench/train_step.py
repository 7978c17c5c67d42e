"""Milliseconds per optimizer step on the paper's setting, against a plain per-time-step loop.

Setting: VGG-SNN, T=10, input 2x48x48, batch 120 per stream. Variants, all in one run on one device:

  loop-fp32 / loop-bf16   plain PyTorch: for t in range(T): conv -> BN2d -> LIF step (python), the
                          same VGG-SNN layers, cross-entropy on the mean logits, AdamW;
  loop-bf16-compile       the same loop under torch.compile (the reference the issue quotes);
  sj-ce-fp32 / sj-ce-bf16 tmkt's spikingjelly multi-step model, events only, cross-entropy only;
  tmkt-fp32 / tmkt-bf16   tmkt's full TMKT step exactly as `tmkt train` runs it (`train_step`):
                          batches from pinned CPU memory, mix ratios and switch steps drawn from a
                          CPU generator, both streams (mixed + event), TET on both, CKA alignment,
                          MAG and MRP, fused AdamW over model + method parameters;
  tmkt-bf16-compile       the same with `tmkt train --compile` (`MethodLoss.compile_core`: both
                          forward passes and every loss as one graph);
  tmkt-bf16-compile-cg    the same with CUDA graphs (torch.compile mode "reduce-overhead").
bf16 runs use autocast and channels_last; every optimizer is AdamW (fused on CUDA). Timing:
--steps steps back to back with one sync at the end (as in training, where nothing waits for
the GPU inside a step), in --rounds rounds after warm-up; the median round per step is
reported, with the first call's seconds (compilation for compiled variants). The compiled TMKT
variants also report their first step's loss against eager's on the same batch and weights.
Prints a table and writes JSON (--json).

    python bench/train_step.py                                   # on a GPU, all variants
    python bench/train_step.py --only tmkt-bf16,tmkt-bf16-compile # some variants, in that order
    python bench/train_step.py --small --steps 2 --rounds 1 --warmup 1  # CPU smoke (tiny shapes)
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
from tmkt.train.config import config_from_dict  # noqa: E402
from tmkt.train.method import MethodConfig, build_method  # noqa: E402
from tmkt.train.step import Objective, make_optimizer, train_step  # noqa: E402

VARIANTS = (
    "loop-fp32", "loop-bf16", "loop-bf16-compile", "sj-ce-fp32", "sj-ce-bf16",
    "tmkt-fp32", "tmkt-bf16", "tmkt-bf16-compile", "tmkt-bf16-compile-cg",
)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name, step, args, device, results, extra=None):
    """Time `step`: first call, warm-up, then rounds of back-to-back steps with one sync each."""
    t0 = time.perf_counter()
    step()  # the first call compiles the compiled variants
    _sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_step = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        per_step.append((time.perf_counter() - t0) * 1e3 / args.steps)
    row = {"variant": name, "ms_per_step": statistics.median(per_step), "min_ms": min(per_step), "first_call_s": first_s}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row.update(extra or {})
    results.append(row)
    print(f"{name:22s} {row['ms_per_step']:9.1f} ms/step  (min {row['min_ms']:.1f}, first call {first_s:.1f} s)", flush=True)


def _ce_step(logits, params, bf16: bool, device, labels):
    """A cross-entropy step with AdamW: ``logits()`` gives the mean-over-T logits ``[B, K]``."""
    opt = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(logits().float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _loop_step(variant, args, width, device, x_ev, labels):
    net = LoopVGG(args.classes, width, args.size).to(device)
    if "bf16" in variant:
        net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net, backend=args.compile_backend) if variant.endswith("compile") else net
    return _ce_step(lambda: fwd(x_ev), net.parameters(), "bf16" in variant, device, labels)


def _model(args, width, device, bf16):
    torch.manual_seed(0)  # every variant starts from the same weights
    model = build_model(ModelConfig(backbone="vgg", num_classes=args.classes, input_size=(args.size, args.size),
                                    width=width, neuron=NeuronConfig(tau=2.0, v_threshold=1.0))).to(device)
    return model.to(memory_format=torch.channels_last) if bf16 else model


def _sj_step(variant, args, width, device, x_ev, labels):
    bf16 = "bf16" in variant
    model = _model(args, width, device, bf16)
    return _ce_step(lambda: model(x_ev, head="event")["logits"].float().mean(0), model.parameters(), bf16, device, labels)


def _tmkt_step(variant, args, width, device, cpu_batch):
    """The trainer's own step (`train_step`, `Objective`, `make_optimizer`, `--compile`)."""
    bf16 = "bf16" in variant
    model = _model(args, width, device, bf16)
    method = build_method(MethodConfig(name="tmkt"), args.timesteps).to(device)
    cuda_graphs = variant.endswith("-cg")
    if "compile" in variant:
        options = {"backend": args.compile_backend, **({"mode": "reduce-overhead"} if cuda_graphs else {})}
        method.compile_core(**options)
    cfg = config_from_dict({"lr": 1e-3})
    opt = make_optimizer(list(model.parameters()) + list(method.parameters()), cfg, device)
    objective = Objective(model, method)
    gen = torch.Generator().manual_seed(0)

    def step():
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = train_step(objective, opt, cpu_batch, cfg.lr, 0.5, gen, device, amp=bf16)
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=120, help="samples per stream")
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--classes", type=int, default=101)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants to run, in this order")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (aot_eager: no code generation, for a quick CPU check of the wiring)")
    args = ap.parse_args()
    only = [v for v in args.only.split(",") if v]
    unknown = set(only) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    variants = [v for v in only if v not in set(args.skip.split(","))]
    width = 1.0
    if args.small:
        args.batch, args.timesteps, args.size, width = 4, 4, 32, 0.125
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    T, B, S = args.timesteps, args.batch, args.size
    static = torch.rand(B, T, 2, S, S)
    events = (torch.rand(B, T, 2, S, S) < 0.1).float() * 2
    labels = torch.randint(0, args.classes, (B,))
    pin = device.type == "cuda"
    cpu_batch = tuple(x.pin_memory() if pin else x for x in (static, events, labels))  # as the DataLoader gives them
    x_ev, y = events.transpose(0, 1).contiguous().to(device), labels.to(device)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "batch_per_stream": B, "timesteps": T, "input": [2, S, S],
        "steps_per_round": args.steps, "rounds": args.rounds,
    }
    print(json.dumps(info), flush=True)
    results: list[dict] = []
    for variant in variants:
        try:
            if variant.startswith("loop"):
                step = _loop_step(variant, args, width, device, x_ev, y)
            elif variant.startswith("sj-ce"):
                step = _sj_step(variant, args, width, device, x_ev, y)
            else:
                step = _tmkt_step(variant, args, width, device, cpu_batch)
            first_loss = float(step())  # from the same weights and draws in every tmkt variant
            bench(variant, step, args, device, results, {"first_loss": first_loss})
        except Exception as e:  # report and go on: one failing variant must not lose the others
            print(f"{variant:22s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append({"variant": variant, "error": f"{type(e).__name__}: {str(e)[:1000]}"})
        step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    done = {r["variant"]: r for r in results if "ms_per_step" in r}
    if "loop-bf16" in done:
        print("\nspeed-up against loop-bf16 (same run):")
        for r in done.values():
            print(f"  {r['variant']:22s} {done['loop-bf16']['ms_per_step'] / r['ms_per_step']:.2f}x")
    if "tmkt-bf16" in done:
        print("first-step loss against eager tmkt-bf16 (same weights and draws):")
        for name in ("tmkt-bf16-compile", "tmkt-bf16-compile-cg"):
            if name in done:
                print(f"  {name:22s} {done[name]['first_loss']:.6f} vs {done['tmkt-bf16']['first_loss']:.6f}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
