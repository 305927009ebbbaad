"""`sinkguard report RUN_DIR`: markdown table and plots from a run's results.json, optionally a CSV."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("report", help="markdown table + plots for a finished run",
                       description="Writes RUN_DIR/report.md (means over seeds with 95 %% intervals, paired "
                                   "tests against SFT), hs_*.png, fa.png, benign_refusal.png, positive_heads.png.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding results.json")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="also write one row per (model, harmful set) plus the pooled row of every run to PATH "
                        "(the columns of docs/results/benchmark_cpu.csv)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import load_results, write_csv, write_report

    for run_dir in args.run_dirs:
        print(f"wrote {write_report(run_dir)}")
    if args.csv:
        records = [r for run_dir in args.run_dirs for r in load_results(run_dir)["records"]]
        print(f"wrote {write_csv({'records': records}, args.csv)}")
    return 0
