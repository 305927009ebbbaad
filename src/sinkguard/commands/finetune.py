"""`sinkguard finetune`: the fine-tuning stage on a poisoned task set, with or without a defense."""

from __future__ import annotations

import argparse

from ..config import FinetuningConfig
from .common import add_data_root, add_model, add_training_args, launch


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune on a (poisoned) task set with a defense",
                       description="Fine-tuning stage: n rows of which round(p*n) are harmful QA pairs. "
                                   "Defaults are the CPU-scale values of the shipped configs.")
    add_model(p)
    add_data_root(p)
    add_training_args(p, FinetuningConfig)
    p.add_argument("--alpha", type=float, default=None, help="Surgery penalty weight (default 300); "
                   "same as --set alpha=VALUE")
    p.add_argument("--sink-impl", choices=["sdpa", "eager"], default=None,
                   help="Surgery sink statistic: SDPA (default) or the official eager path; "
                        "same as --set sink_impl=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import config_from_args
    from ..data import poisoned_dataset

    config = config_from_args(FinetuningConfig, args, {"alpha": args.alpha, "sink_impl": args.sink_impl})
    rows = poisoned_dataset(config.tasks[0], config.samples, config.poison_ratios[0], config.attack, args.seed,
                            args.data_root, keep_input=config.template == "alpaca")
    return launch(config, args, rows)
