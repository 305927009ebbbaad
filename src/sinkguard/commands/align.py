"""`sinkguard align`: the alignment stage on refusal data with an alignment-stage defense."""

from __future__ import annotations

import argparse

from ..config import AlignmentConfig
from .common import add_data_root, add_model, add_training_args, launch


def register(sub) -> None:
    p = sub.add_parser("align", help="safety-align a model on refusal data (sinkguard defenses lists the methods)",
                       description="Alignment stage: the first n rows of the refusal set. Defaults are the "
                                   "CPU-scale values of the shipped configs (configs/*.yaml).")
    add_model(p)
    add_data_root(p)
    add_training_args(p, AlignmentConfig)
    p.add_argument("--rho", type=float, default=None, help="perturbation intensity (Vaccine/T-Vaccine); "
                   "same as --set rho=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import config_from_args
    from ..data import alignment_dataset

    config = config_from_args(AlignmentConfig, args, {"rho": args.rho})
    rows = alignment_dataset(config.samples, args.data_root, keep_input=config.template == "alpaca")
    return launch(config, args, rows)
