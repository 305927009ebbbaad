"""`sinkguard repair`: a post-fine-tuning defense (Antidote) applied to a fine-tuned model."""

from __future__ import annotations

import argparse

from .common import add_data_root


def register(sub) -> None:
    p = sub.add_parser("repair", help="repair a fine-tuned model with a post-fine-tuning defense (antidote)",
                       description="Post-fine-tuning stage: writes OUT/model (safetensors) and OUT/repair_log.json. "
                       "A LoRA fine-tune is repaired through its unmerged adapter (the stage's adapter/ folder, "
                       "or --adapter).")
    add_data_root(p)
    p.add_argument("--defense", default="antidote", help="post-fine-tuning defense (default %(default)s)")
    p.add_argument("--model", required=True, help="the fine-tuned model directory")
    p.add_argument("--adapter", default=None, help="its LoRA adapter folder (default: MODEL/../adapter if present)")
    p.add_argument("--out", required=True, help="output folder (a finished repair is reused)")
    p.add_argument("--dense-ratio", type=float, default=None, help="share of each row pruned (Antidote, default 0.1)")
    p.add_argument("--samples", type=int, default=None,
                   help="harmful calibration rows (default: all the data allows, disjoint from the attack rows)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..defenses import get_defense
    from ..errors import SinkguardError

    spec = get_defense(args.defense, "post_finetuning")
    options = {"dense_ratio": args.dense_ratio, "samples": args.samples}
    known = {f.name for f in dataclasses.fields(spec.config_cls)}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise SinkguardError(f"defense {args.defense!r} has no option(s) {', '.join(unknown)}")
    path = spec.apply(args.model, args.out, spec.config_cls(**given), data_root=args.data_root,
                      adapter_dir=args.adapter)
    print(f"repair done: model saved to {path}")
    return 0
