"""Statistics of the built-in sets' emulated recordings, beside published N-MNIST figures (docs/data.md).

For each built-in set, emulates ``--n`` recordings of its event pool with the set's camera
settings (plus ``--option`` overrides) and prints events per recording (mean, median, 5-95 %),
duration, ON share and event rate.

    python bench/emulated_stats.py --n 500
    python bench/emulated_stats.py --sets mnist -o threshold=0.25   # the emulator's generic threshold
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tmkt.data.builtin import parse_options  # noqa: E402
from tmkt.data.emulator import emulate_batch  # noqa: E402
from tmkt.data.registry import BUILTIN  # noqa: E402


def recording_stats(name: str, n: int, options: dict, seed: int = 0) -> dict[str, float]:
    """Events per recording, duration, ON share and rate over ``n`` event-pool images spread evenly
    over the pool (the pools are ordered by class)."""
    dataset = BUILTIN[name]
    config, _, image_size = parse_options(dataset, options, seed)
    images, labels = dataset.images(image_size)
    _, event_idx = dataset.pools(labels)
    pick = event_idx[np.linspace(0, len(event_idx) - 1, min(n, len(event_idx))).astype(int)]
    recordings = emulate_batch(images[pick], config)
    counts = np.array([len(r) for r in recordings], dtype=np.float64)
    spans = np.array([(r["t"][-1] - r["t"][0]) / 1e6 for r in recordings])
    on = np.array([r["p"].mean() for r in recordings])
    return {
        "recordings": len(recordings),
        "events_mean": float(counts.mean()),
        "events_median": float(np.median(counts)),
        "events_p5": float(np.percentile(counts, 5)),
        "events_p95": float(np.percentile(counts, 95)),
        "duration_ms": float(1e3 * spans.mean()),
        "on_share": float(on.mean()),
        "rate_kev_s": float((counts / spans).mean() / 1e3),
        "sensor": f"{image_size + 2 * config.padding}x{image_size + 2 * config.padding}",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="digits,mnist")
    p.add_argument("--n", type=int, default=500, help="recordings per set")
    p.add_argument("--option", "-o", action="append", default=[], help="emulator option KEY=VALUE")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.option)}
    rows = {name: recording_stats(name, args.n, options) for name in args.sets.split(",")}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| set | sensor | recordings | events / recording: mean, median (5-95 %) | duration (ms) | ON share | rate (kev/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s['sensor']} | {s['recordings']} | {s['events_mean']:,.0f}, {s['events_median']:,.0f} "
              f"({s['events_p5']:,.0f}-{s['events_p95']:,.0f}) | {s['duration_ms']:.1f} | {s['on_share']:.3f} | {s['rate_kev_s']:.1f} |")


if __name__ == "__main__":
    main()
