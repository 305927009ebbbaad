"""`sinkguard analyze`: per-head sink divergence of a model on harmful vs harmless texts."""

from __future__ import annotations

import argparse

from .common import add_data_root, add_model


def register(sub) -> None:
    p = sub.add_parser("analyze", help="sink divergence heatmap and count of positive heads",
                       description="Mean attention on the sink token, harmful minus harmless texts, "
                       "per (layer, head); writes sink_divergence.png and sink_divergence.json.")
    add_model(p)
    add_data_root(p)
    p.add_argument("--samples", type=int, default=64, help="texts per group (default %(default)s)")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"],
                   help="beavertails split the texts come from (default: Surgery's pools, train)")
    p.add_argument("--sink-index", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sink import analyze

    s = analyze(args.model, args.out, args.samples, args.split, args.sink_index, args.batch_size,
                args.max_length, args.data_root)
    print(f"positive-divergence heads: {s['positive_heads']} of {s['total_heads']} "
          f"(mean divergence {s['mean_divergence']:+.5f}); wrote {args.out}/sink_divergence.png and .json")
    return 0
