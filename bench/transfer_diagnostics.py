"""Why does (or doesn't) static-to-event transfer work? Probes of the trained runs of a `bench/methods.py` grid.

For every run directory in ``<runs-dir>/results.jsonl`` (filtered by ``--sets``, ``--amounts``,
``--variants``) this loads the best-validation weights and measures, on the run's own
validation split (events) and static images of the same classes:

- ``acc_event``: the event head on validation events (the number the run was selected on);
- ``acc_event_on_static`` / ``acc_event_on_mixed``: the event head on static sequences of the
  same classes, and on time-step mixes of the two at r = 0.5 (does the deployed classifier
  read what the static stream taught?); ``acc_mixed_on_static``: the separate mixed head on
  static sequences (what the papers' design trains);
- ``ncm_event`` / ``ncm_static``: nearest-class-mean accuracy of the trunk's features
  (pooled spikes averaged over T) on validation events, with class means from the run's few
  event training recordings or from static images: how good the trunk is, apart from the head;
- ``cka_t``: linear CKA per step between the last LIF layer's membranes of paired static and
  event sequences (what the alignment loss maximises);
- ``grad_*``: norms of each loss term's gradient (times its weight in the objective) with
  respect to the trunk on one training batch at the final weights, and the cosine between the
  source stream's and the event stream's classification gradients.

It also tabulates the mix ratios that TMKT realises (share of event frames, pure-static
sequences, switch step) against what the schedule asks, beside EKT's replacement schedule.
Writes ``<runs-dir>/diagnostics.jsonl`` and a markdown section (mean ± std over seeds).

    python bench/transfer_diagnostics.py --runs-dir runs/bench-methods --amounts 2/class
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tmkt.checkpoint import load_run  # noqa: E402
from tmkt.data.registry import build_data_for_run  # noqa: E402
from tmkt.data.static import static_frames  # noqa: E402
from tmkt.train.losses import linear_cka_per_step  # noqa: E402
from tmkt.train.method import MethodConfig, build_method  # noqa: E402
from tmkt.train.tsm import draw_switch_steps, mix_at_switch, solve_switch_prob  # noqa: E402

PROBE_KEYS = (
    "acc_event", "acc_event_on_static", "acc_event_on_mixed", "acc_mixed_on_static", "ncm_event", "ncm_static",
    "cka_mean", "grad_src", "grad_event", "grad_align", "grad_mag", "grad_mrp", "cos_src_event",
)


def _paired_static(bundle, labels: np.ndarray, seed: int) -> torch.Tensor:
    """One static sequence ``[N, T, 2, H, W]`` per label, a random pool image of that class."""
    pool = bundle.train.static
    rng = np.random.default_rng(seed)
    by_class = {int(c): np.flatnonzero(pool.labels == c) for c in np.unique(pool.labels)}
    idx = [int(rng.choice(by_class[int(y)])) for y in labels]
    t = bundle.spec.timesteps
    return torch.from_numpy(np.stack([static_frames(pool.images[i], pool.size, t) for i in idx]))


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([torch.as_tensor(x[-2]) for x in items]), torch.as_tensor([int(x[-1]) for x in items])


@torch.no_grad()
def _forward(model, x: torch.Tensor, head: str = "event", batch: int = 128) -> dict[str, torch.Tensor]:
    """Model outputs for batch-first frames ``[N, T, C, H, W]``, run in chunks; features averaged over T."""
    outs: dict[str, list[torch.Tensor]] = {"logits": [], "features": [], "membrane": []}
    for s in range(0, len(x), batch):
        out = model(x[s : s + batch].transpose(0, 1), head=head)
        outs["logits"].append(out["logits"].mean(0))
        outs["features"].append(out["features"].mean(0))
        outs["membrane"].append(out["membrane"])
    return {"logits": torch.cat(outs["logits"]), "features": torch.cat(outs["features"]),
            "membrane": torch.cat(outs["membrane"], dim=1)}


def _ncm(train_feats: torch.Tensor, train_labels: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> float:
    classes = torch.unique(train_labels)
    means = torch.stack([train_feats[train_labels == c].mean(0) for c in classes])
    pred = classes[torch.cdist(feats, means).argmin(1)]
    return float((pred == labels).float().mean())


def _grad_terms(model, mcfg: MethodConfig, static: torch.Tensor, events: torch.Tensor, labels: torch.Tensor,
                eta_weight: float, generator: torch.Generator) -> dict[str, float]:
    """Gradient norm of each weighted loss term (`MethodLoss.terms`, the training objective's own
    terms) w.r.t. the trunk, and the src/event cosine. The source stream is fixed so that runs
    compare: EKT's all static (no replacement), TMKT's mixed at r = 0.5; finetune shows both of
    its phases' terms; the alignment weight is the run's last logged one."""
    params = [p for p in model.trunk.parameters() if p.requires_grad]
    model.train()
    st, ev = static.transpose(0, 1), events.transpose(0, 1)
    t, batch = ev.shape[0], len(labels)
    loss_mod = build_method(mcfg, t)
    with torch.no_grad():
        w = min(max(eta_weight, 1e-6), 1 - 1e-6)
        loss_mod.eta.fill_(float(np.log(w / (1 - w))))  # sigmoid(eta) = the logged weight
    draw = None
    if mcfg.name == "ekt":
        draw = torch.zeros(batch, dtype=torch.bool)
    elif mcfg.name == "tmkt":
        draw = draw_switch_steps(torch.full((batch,), 0.5, dtype=torch.float64), t, generator)
    terms, _ = loss_mod.terms(model, st, ev, labels, draw, static_phase=False)
    if mcfg.name == "finetune":
        terms.update(loss_mod.terms(model, st, ev, labels, draw, static_phase=True)[0])
    grads = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for k, v in terms.items()}
    model.eval()

    def flat(g) -> torch.Tensor:
        return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])

    flats = {k: flat(g) for k, g in grads.items()}
    out = {f"grad_{k}": float(v.norm()) for k, v in flats.items()}
    if "src" in flats:
        out["cos_src_event"] = float(torch.nn.functional.cosine_similarity(flats["src"], flats["event"], dim=0))
    return out


def probe_run(run_dir: str, seed: int) -> dict[str, Any]:
    """Every probe of one trained run (see the module docstring)."""
    run = load_run(run_dir)
    model = run.model
    bundle = build_data_for_run(run.config)
    mcfg = MethodConfig.from_dict(run.config["train"]["method"])
    val_x, val_y = _stack(bundle.val)
    val_static = _paired_static(bundle, val_y.numpy(), seed)
    gen = torch.Generator().manual_seed(seed)
    r = torch.full((len(val_y),), 0.5, dtype=torch.float64)
    mixed = mix_at_switch(val_static.transpose(0, 1), val_x.transpose(0, 1), draw_switch_steps(r, val_x.shape[1], gen))
    ev_out = _forward(model, val_x)
    st_out = _forward(model, val_static)
    mix_out = _forward(model, mixed.mixed.transpose(0, 1))
    acc = lambda out: float((out["logits"].argmax(1) == val_y).float().mean())  # noqa: E731
    row: dict[str, Any] = {
        "acc_event": acc(ev_out), "acc_event_on_static": acc(st_out), "acc_event_on_mixed": acc(mix_out),
        "acc_mixed_on_static": acc(_forward(model, val_static, head="mixed")),
    }
    train_ev, train_y = _stack(bundle.train.events)
    tr_feats = _forward(model, train_ev)["features"]
    row["ncm_event"] = _ncm(tr_feats, train_y, ev_out["features"], val_y)
    pool_y = torch.as_tensor(bundle.train.static.labels)
    pick = np.random.default_rng(seed).permutation(len(pool_y))[:500]
    st_pool = _forward(model, _paired_static(bundle, pool_y.numpy()[pick], seed + 1))["features"]
    row["ncm_static"] = _ncm(st_pool, pool_y[pick], ev_out["features"], val_y)
    n = min(256, len(val_y))
    cka_t = linear_cka_per_step(st_out["membrane"][:, :n], ev_out["membrane"][:, :n]).abs()
    row["cka_t"] = [round(float(v), 4) for v in cka_t]
    row["cka_mean"] = float(cka_t.mean())
    metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    eta_weight = next((m["train_eta_weight"] for m in reversed(metrics) if "train_eta_weight" in m), 0.73)
    batch = min(32, len(train_y))
    train_static = _paired_static(bundle, train_y[:batch].numpy(), seed + 2)
    row.update(_grad_terms(model, mcfg, train_static, train_ev[:batch], train_y[:batch], float(eta_weight), gen))
    row["train_cka_by_epoch"] = [round(m["train_cka"], 4) for m in metrics if "train_cka" in m]
    return row


def mix_ratio_table(timesteps: int, draws: int = 200_000, seed: int = 0) -> str:
    """What TMKT's TSM realises for r ~ U(0, 1) and for the progress schedule, beside EKT's replacement."""
    g = torch.Generator().manual_seed(seed)
    lines = [
        f"Realised mixes at T = {timesteps} ({draws:,} draws per row): share of event frames in the source stream,",
        "share of source sequences with no event frame, mean switch step t* (1-based, among sequences that switch).",
        "",
        "| schedule | asked mean r | realised event-frame share | pure-static sequences | mean t* | t* histogram (t = 1..T) |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, r: torch.Tensor) -> str:
        steps = draw_switch_steps(r, timesteps, g)  # 0-based; T = no switch
        share = (timesteps - steps).double() / timesteps
        switched = steps[steps < timesteps]
        hist = torch.bincount(switched, minlength=timesteps).double() / len(steps)
        return (f"| {name} | {float(r.mean()):.3f} | {float(share.mean()):.3f} | {float((steps == timesteps).double().mean()):.3f} "
                f"| {float(switched.double().mean()) + 1:.2f} | {' '.join(f'{v:.2f}' for v in hist.tolist())} |")

    lines.append(row("tmkt uniform r ~ U(0, 1)", torch.rand(draws, generator=g, dtype=torch.float64)))
    for prog in (0.1, 0.5, 0.9):
        lines.append(row(f"tmkt progress, at {prog:.0%} of training", torch.full((draws,), prog, dtype=torch.float64)))
    progress = torch.rand(draws, generator=g, dtype=torch.float64)
    lines.append(row("tmkt progress, whole run", progress))
    p_replace = progress ** 3
    lines += [
        "",
        f"EKT over a whole run: each sequence is all-static or all-event; share of event sequences "
        f"E[progress^3] = {float(p_replace.mean()):.3f} (0 at the start, {0.5 ** 3:.3f} at mid-run, 1 at the end).",
        "Switch probability p per step for r = 0.1 / 0.5 / 0.9: "
        + " / ".join(f"{float(solve_switch_prob(torch.tensor([r], dtype=torch.float64), timesteps)[0]):.4f}" for r in (0.1, 0.5, 0.9)),
        "",
    ]
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _plain(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.3f}" if values else "-"


def markdown(rows: list[dict[str, Any]], timesteps: int) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["amount"], r["variant"]), []).append(r)
    lines = [
        "| set | amount | variant | event head on events | event head on static | event head on mixed (r=0.5) "
        "| mixed head on static | NCM, event means | NCM, static means | CKA static/event | training CKA, first → last epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (s, a, v), g in groups.items():
        curves = [r["train_cka_by_epoch"] for r in g if r.get("train_cka_by_epoch")]
        trend = f"{statistics.fmean(c[0] for c in curves):.3f} → {statistics.fmean(c[-1] for c in curves):.3f}" if curves else "-"
        lines.append(f"| {s} | {a} | {v} | " + " | ".join(_cell([r.get(k) for r in g]) for k in (
            "acc_event", "acc_event_on_static", "acc_event_on_mixed", "acc_mixed_on_static", "ncm_event", "ncm_static",
            "cka_mean")) + f" | {trend} |")
    lines += [
        "",
        "Gradient norms w.r.t. the trunk of each weighted loss term on one training batch at the final weights "
        "(mean over seeds), and the cosine between the source-stream and event-stream classification gradients:",
        "",
        "| set | amount | variant | event TET | source TET | alignment | MAG | MRP | cos(source, event) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (s, a, v), g in groups.items():
        lines.append(f"| {s} | {a} | {v} | " + " | ".join(_plain([r.get(k) for r in g]) for k in (
            "grad_event", "grad_src", "grad_align", "grad_mag", "grad_mrp", "cos_src_event")) + " |")
    lines += ["", mix_ratio_table(timesteps)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs/bench-methods")
    p.add_argument("--sets", default="digits,mnist")
    p.add_argument("--amounts", default="2/class", help="comma-separated amounts as in results.jsonl (e.g. 2/class,5/class)")
    p.add_argument("--variants", default="", help="comma-separated variants (default: all in the log)")
    p.add_argument("--run-seeds", default="", help="comma-separated training seeds to probe (default: all in the log)")
    p.add_argument("--seed", type=int, default=0, help="seeds the probe's static pairing and mixes")
    p.add_argument("--out", default=None, help="markdown file (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.runs_dir)
    results = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines() if line.strip()]
    sets, amounts = set(args.sets.split(",")), set(args.amounts.split(","))
    variants = set(args.variants.split(",")) if args.variants else None
    seeds = {int(v) for v in args.run_seeds.split(",")} if args.run_seeds else None
    chosen = [r for r in results if r["set"] in sets and r["amount"] in amounts and (variants is None or r["variant"] in variants)
              and (seeds is None or r["seed"] in seeds)]
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in results))}
    chosen.sort(key=lambda r: (r["set"], r["amount"], order[r["variant"]], r["seed"]))
    log = root / "diagnostics.jsonl"
    done = {}
    if log.is_file():
        done = {d["run_dir"]: d for d in map(json.loads, log.read_text().splitlines()) if d}
    rows = []
    for i, r in enumerate(chosen, 1):
        if r["run_dir"] in done:
            rows.append(done[r["run_dir"]])
            continue
        row = {k: r[k] for k in ("set", "amount", "variant", "seed", "run_dir")} | probe_run(r["run_dir"], args.seed)
        rows.append(row)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"[{i}/{len(chosen)}] {r['set']} {r['amount']} {r['variant']} s{r['seed']}: "
              + ", ".join(f"{k} {row[k]:.3f}" for k in PROBE_KEYS if isinstance(row.get(k), float)), flush=True)
    timesteps = json.loads((Path(chosen[0]["run_dir"]) / "config.json").read_text())["data"]["timesteps"] if chosen else 6
    text = markdown(rows, timesteps)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
