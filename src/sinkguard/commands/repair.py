"""`sinkguard repair`: a post-fine-tuning defense applied to a fine-tuned model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PostFinetuningConfig, add_config_args
from ..data.formatting import TEMPLATES
from .common import add_data_root, add_overwrite


def register(sub) -> None:
    p = sub.add_parser("repair", help="apply a post-fine-tuning defense to a fine-tuned model",
                       description="Post-fine-tuning stage: repairs MODEL (e.g. Antidote's pruning) into OUT. "
                                   "A LoRA fine-tune's adapter (MODEL/../adapter) is used when present.")
    p.add_argument("--model", required=True, help="the fine-tuned model folder (a stage's OUT/model)")
    p.add_argument("--adapter", default=None,
                   help="its unmerged LoRA adapter (default: MODEL/../adapter when that folder exists)")
    add_data_root(p)
    add_config_args(p, PostFinetuningConfig)
    p.add_argument("--dense-ratio", type=float, default=None,
                   help="Antidote: share of each row pruned (default 0.1; same as --set dense_ratio=...)")
    p.add_argument("--samples", type=int, default=None,
                   help="Antidote: harmful calibration rows (default: all the data allows, disjoint from the attack "
                        "rows; same as --set samples=...)")
    p.add_argument("--template", choices=TEMPLATES, default="chat",
                   help="format MODEL was fine-tuned with, used for the calibration rows (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import config_from_args
    from ..errors import SinkguardError
    from ..train import run_post_stage

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SinkguardError(f"--model {model} is not a model folder (no config.json); give a fine-tuned "
                             "stage's OUT/model")
    adapter = Path(args.adapter) if args.adapter else model.parent / "adapter"
    if args.adapter and not (adapter / "adapter_config.json").is_file():
        raise SinkguardError(f"--adapter {adapter} is not a peft adapter folder (no adapter_config.json)")
    shortcuts = {k: getattr(args, k) for k in ("dense_ratio", "samples") if getattr(args, k) is not None}
    config = config_from_args(PostFinetuningConfig, args, extra_options=shortcuts)
    if not config.defenses:
        raise SinkguardError("name the post-fine-tuning defense with --defense (sinkguard defenses lists them)")
    defense = config.defenses[0]
    path = run_post_stage(defense, model, args.out, options=config.defense_options(defense),
                          adapter_dir=adapter if (adapter / "adapter_config.json").is_file() else None,
                          data_root=args.data_root, overwrite=args.overwrite, template=args.template)
    print(f"post_finetuning {defense} done: model saved to {path}")
    return 0
