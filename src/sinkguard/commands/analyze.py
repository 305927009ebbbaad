"""`sinkguard analyze`: per-head sink divergence of a model, or over a fine-tuning run's checkpoints."""

from __future__ import annotations

import argparse

from ..config import TEMPLATES
from ..errors import SinkguardError
from .common import add_data_root, add_model


def register(sub) -> None:
    p = sub.add_parser("analyze", help="sink divergence heatmap and count of positive heads",
                       description="Mean attention on the sink token, harmful minus harmless texts, "
                       "per (layer, head); writes sink_divergence.png and sink_divergence.json. With --run, "
                       "the same at every kept checkpoint of a fine-tuning run, with each checkpoint's HS: "
                       "sink_hypothesis.csv, sink_hypothesis.png and Spearman's rho in sink_hypothesis.json.")
    add_model(p)
    add_data_root(p)
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a fine-tuning stage folder trained with --keep-checkpoints, or a study run folder "
                        "(its stages/ft-* with kept checkpoints)")
    p.add_argument("--samples", type=int, default=64, help="texts per group (default %(default)s)")
    p.add_argument("--split", default=None, choices=["train", "validation", "test"],
                   help="beavertails split the texts come from (default: train = Surgery's pools for one "
                        "model; validation, which the pools never use, with --run)")
    p.add_argument("--sink-index", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--hs-sets", default="beavertails", help="--run: harmful prompt sets for each checkpoint's HS")
    p.add_argument("--hs-limit", type=int, default=100, help="--run: prompts per set (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="--run: answer length (default %(default)s)")
    p.add_argument("--template", default=None, choices=TEMPLATES,
                   help="format of the texts and prompts: the one the model was trained with (default: chat; "
                        "with --run, each run's own)")
    p.add_argument("--out", default=None, help="output folder of the CSV, plot and summary (default: RUN_DIR with "
                   "--run; required otherwise); each run's measured points stay cached in RUN_DIR/analysis")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="--run: delete a run's checkpoints once all its points are measured (disk); later calls "
                        "reuse the cached points")
    p.set_defaults(func=run)


def _hs_settings(args: argparse.Namespace):
    """The --run HS settings as an `EvaluationConfig`, checked as `sinkguard evaluate` checks them."""
    from ..config import EvaluationConfig, validate

    sets = [s.strip() for s in args.hs_sets.split(",") if s.strip()]
    if not sets:
        raise SinkguardError("--hs-sets must name at least one harmful prompt set, e.g. beavertails")
    e = EvaluationConfig(hs_sets=sets, hs_limit=args.hs_limit, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size)
    flags = {"hs_sets": "--hs-sets", "hs_limit": "--hs-limit", "max_new_tokens": "--max-new-tokens",
             "batch_size": "--batch-size"}
    validate(e, "", lambda name: flags.get(name, name))
    return e


def run(args: argparse.Namespace) -> int:
    for flag in ("samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise SinkguardError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.run:
        from ..trajectory import analyze_run

        e = _hs_settings(args)
        s = analyze_run(args.run, args.out, samples=args.samples, split=args.split or "validation",
                        hs_sets=tuple(e.hs_sets), hs_limit=e.hs_limit, max_new_tokens=e.max_new_tokens,
                        batch_size=e.batch_size, data_root=args.data_root, template=args.template,
                        drop_checkpoints=args.drop_checkpoints)
        out = args.out or args.run
        rho = (f"Spearman rho {s['spearman_rho']:+.3f} [{s['rho_lo']:+.3f}, {s['rho_hi']:+.3f}] ({s['interval']})"
               if s.get("spearman_rho") is not None else f"Spearman rho n/a ({s.get('note')})")
        print(f"{s['n_points']} checkpoints of {s['runs']} run(s): {rho}; wrote {out}/sink_hypothesis.csv, .png, .json")
        return 0
    if not args.out:
        raise SinkguardError("--out is required (the folder for sink_divergence.png and .json)")
    from ..sink import analyze

    s = analyze(args.model, args.out, args.samples, args.split or "train", args.sink_index, args.batch_size,
                args.max_length, args.data_root, args.template or "chat")
    print(f"positive-divergence heads: {s['positive_heads']} of {s['total_heads']} "
          f"(mean divergence {s['mean_divergence']:+.5f}); wrote {args.out}/sink_divergence.png and .json")
    return 0
