"""`sinkguard run CONFIG`: a whole study (align, fine-tune grid, post-fine-tune, evaluate) from one YAML file."""

from __future__ import annotations

import argparse

from .common import add_overwrite


def register(sub) -> None:
    p = sub.add_parser("run", help="run (or resume) a study from a YAML config",
                       description="Align, fine-tune over defenses x poison ratios x tasks, apply the "
                       "post-fine-tuning defenses, evaluate; finished stages are cached, so rerunning resumes.")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/<name>)")
    p.add_argument("--data-root", default=None, help="overrides the config's data_root")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the stages that would run; loads no model, downloads nothing")
    add_overwrite(p)
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    p.set_defaults(func=run)


def render_plan(plan: list[dict], run_dir) -> str:
    """The plan of `Experiment.plan()` as text: one line per stage, with its folder and step count."""
    lines = [f"{len(plan)} stages into {run_dir}:"]
    for job in plan:
        what = [job["stage"], job.get("defense") or job.get("record", {}).get("defense", "")]
        if job["stage"] == "evaluation":
            r = job["record"]
            what = ["evaluation", f"{r['alignment']}/{r['defense']}" + (f"+{r['post']}" if r["post"] != "none" else ""),
                    f"task={r['task']}"] + ([f"p={r['poison_ratio']:g}"] if r["poison_ratio"] is not None else [])
        elif job["stage"] == "finetuning":
            what += [f"task={job['task']}", f"p={job['poison_ratio']:g}"]
        what.append(f"seed={job['seed']}")
        steps = f", {job['steps']} steps" if job.get("steps") else ""
        lines.append(f"  {' '.join(what)}: {job['folder']} (from {job['from']}{steps})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..distributed import world_size
    from ..errors import SinkguardError
    from ..experiment import Experiment, ExperimentConfig

    if world_size() > 1:
        raise SinkguardError("`sinkguard run` runs in one process (its evaluation is not sharded); launch "
                             "`sinkguard align` / `finetune` under torchrun or accelerate instead")
    from ..report import results_table, write_report

    config = ExperimentConfig.from_yaml(args.config)
    if args.data_root:
        config.data_root = args.data_root
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    experiment = Experiment(config, run_dir, overwrite=args.overwrite)
    if args.dry_run:
        print(render_plan(experiment.plan(), run_dir))
        return 0
    results = experiment.run()
    print(results_table(results))
    if not args.no_report:
        print(f"report: {write_report(run_dir)}")
    return 0
