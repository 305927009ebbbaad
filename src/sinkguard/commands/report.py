"""`sinkguard report RUN_DIR`: markdown table and plots from a run's results.json."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("report", help="markdown table + plots for a finished run",
                       description="Writes RUN_DIR/report.md, hs_*.png, fa.png, positive_heads.png.")
    p.add_argument("run_dir", help="a run folder holding results.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0
