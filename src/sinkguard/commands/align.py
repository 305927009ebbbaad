"""`sinkguard align`: the alignment stage on refusal data with any alignment-stage defense."""

from __future__ import annotations

import argparse

from .common import add_data_root, add_model
from .finetune import add_training_args, launch


def register(sub) -> None:
    p = sub.add_parser("align", help="safety-align a model on refusal data (sft, vaccine, tvaccine, booster, repnoise, antibody)",
                       description="Alignment stage: the first n rows of the refusal set.")
    add_model(p)
    add_data_root(p)
    p.add_argument("--defense", default="sft", help="an alignment-stage defense: sft, vaccine, tvaccine, booster, repnoise, antibody "
                   "(default %(default)s)")
    p.add_argument("--rho", type=float, default=None, help="perturbation intensity (Vaccine/T-Vaccine)")
    p.add_argument("--system-prompt", default=None, help="system prompt on the alignment data")
    add_training_args(p, lr=1e-3, epochs=20, batch=10)
    p.set_defaults(func=run, samples=2000)


def run(args: argparse.Namespace) -> int:
    from ..data import alignment_dataset

    rows = alignment_dataset(args.samples, args.data_root)
    return launch("alignment", args, rows, **({"rho": args.rho} if args.rho is not None else {}))
