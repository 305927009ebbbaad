"""`sinkguard report RUN_DIR`: markdown table and plots from a run's results.json, optionally a CSV."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("report", help="markdown table + plots for a finished run",
                       description="Writes RUN_DIR/report.md (means over seeds with 95 %% intervals, paired "
                                   "tests against SFT), hs_*.png, fa.png, benign_refusal.png, positive_heads.png.")
    p.add_argument("run_dir", help="a run folder holding results.json")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="also write one row per (model, harmful set) plus the pooled row to PATH "
                        "(the columns of docs/results/benchmark_cpu.csv)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import load_results, write_csv, write_report

    print(f"wrote {write_report(args.run_dir)}")
    if args.csv:
        print(f"wrote {write_csv(load_results(args.run_dir), args.csv)}")
    return 0
