"""`sinkguard run CONFIG`: a whole study (align, fine-tune grid, evaluate) from one YAML file."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("run", help="run (or resume) a study from a YAML config",
                       description="Align, fine-tune over defenses x poison ratios x tasks, evaluate; "
                       "finished stages are cached, so rerunning resumes.")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/<name>)")
    p.add_argument("--data-root", default=None, help="overrides the config's data_root")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..distributed import world_size
    from ..errors import SinkguardError
    from ..experiment import ExperimentConfig, run_experiment

    if world_size() > 1:
        raise SinkguardError("`sinkguard run` runs in one process (its evaluation is not sharded); launch "
                             "`sinkguard align` / `finetune` under torchrun or accelerate instead")
    from ..report import results_table, write_report

    config = ExperimentConfig.from_yaml(args.config)
    if args.data_root:
        config.data_root = args.data_root
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    results = run_experiment(config, run_dir)
    print(results_table(results))
    if not args.no_report:
        print(f"report: {write_report(run_dir)}")
    return 0
