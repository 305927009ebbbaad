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
                   help="validate the config and print the stages that would run, their step counts and an estimate "
                        "of memory per device and tokens; loads no model, downloads nothing")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="(dry run) estimate memory per device with full fine-tuning sharded over N devices "
                        "(FSDP full shard / ZeRO-3; LoRA runs under DDP, unsharded) (default 1)")
    p.add_argument("--seeds", default=None, metavar="S[,S...]",
                   help="run only these of the config's seeds now (the others later, into the same folder); "
                        "results.json keeps the other seeds' finished cells")
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


def _count(n: float) -> str:
    """A token count in words: 5.12M, 1.3B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def render_estimates(config, plan: list[dict], devices: int = 1) -> str:
    """Memory per device and tokens of each training stage of `plan` (one line pair per stage and
    defense), from the shipped size facts of `config.model` (`sinkguard.plan`)."""
    from ..plan import PAPER_MODELS, find_facts, stage_estimate

    facts = find_facts(config.model)
    groups: dict[tuple[str, str], list[dict]] = {}
    for job in plan:
        if job.get("steps"):
            groups.setdefault((job["stage"], job["defense"]), []).append(job)
    if facts is None:
        head = (f"estimates: no size facts for {config.model!r} (shipped: {', '.join(PAPER_MODELS)}; a local model "
                "folder or a cached hub model also works), so memory is not estimated; tokens are upper bounds:")
    else:
        shard = f"full fine-tuning sharded over {devices} devices" if devices > 1 else "one device"
        head = (f"estimates ({config.model}: {facts.params() / 1e9:.2f}B parameters; memory per device, {shard}; "
                "steps of one process; upper bounds: every example at its token limit):")
    lines = [head]
    chat = [name for name in ("alignment", "finetuning", "evaluation")
            if getattr(config, name) is not None and getattr(config, name).template == "chat"]
    if facts is not None and facts.chat_template is False and chat:
        lines.append(f"  warning: {config.model}'s tokenizer ships no chat template, which template chat "
                     f"({', '.join(chat)}) formats rows with: the run stops there; set template: alpaca")
    total = 0
    for (stage_name, defense), jobs in groups.items():
        stage = getattr(config, stage_name)
        est = stage_estimate(facts, stage, defense, jobs[0]["steps"], devices)
        total += est["tokens"] * len(jobs)  # a stage's runs share its settings, hence its step count
        accum = f" x {est['grad_accum']} accumulated" if est["grad_accum"] > 1 else ""
        ddp = " (unsharded: LoRA runs under DDP)" if devices > 1 and stage.lora else ""
        lines.append(f"  - {stage_name} {defense} ({len(jobs)} run{'s' if len(jobs) > 1 else ''}): {jobs[0]['steps']} "
                     f"steps of {est['batch']} x <= {est['max_length']} tokens{accum}"
                     f"{' ' + est['note'] if est['note'] else ''}; {est['lora']}{ddp}, {est['precision']}")
        mem = est["memory"]
        memory = "memory not estimated" if mem is None else (
            f"memory ~ {mem['total']:.1f} GiB (weights {mem['weights']:.1f}, gradients {mem['gradients']:.1f}, "
            f"AdamW {mem['optimizer']:.1f}" + (f", defense copies {mem['copies']:.1f}" if mem["copies"] >= 0.05 else "")
            + f", activations {mem['activations']:.1f})")
        lines.append(f"    {memory}; tokens <= {_count(est['tokens'])} per run")
    lines.append(f"  training tokens in all <= {_count(total)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import coerce
    from ..distributed import world_size
    from ..errors import SinkguardError
    from ..experiment import Experiment, ExperimentConfig

    if world_size() > 1:
        raise SinkguardError("`sinkguard run` runs in one process (its evaluation is not sharded); launch "
                             "`sinkguard align` / `finetune` under torchrun or accelerate instead")
    from ..report import results_table, write_report

    config = ExperimentConfig.from_yaml(args.config, resolve_model=not args.dry_run)  # dry run: offline
    if args.data_root:
        config.data_root = args.data_root
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    experiment = Experiment(config, run_dir, overwrite=args.overwrite)
    seeds = None
    if args.seeds is not None:
        try:
            seeds = coerce(args.seeds, list[int], "--seeds", from_text=True)
        except SinkguardError:
            raise SinkguardError(f"--seeds takes seeds separated by commas, e.g. 43,44; got {args.seeds!r}") from None
    if args.dry_run:
        if args.devices < 1:
            raise SinkguardError(f"--devices must be >= 1, got {args.devices}")
        plan = experiment.plan(seeds)
        print(render_plan(plan, run_dir))
        print(render_estimates(config, plan, args.devices))
        return 0
    results = experiment.run(seeds)
    print(results_table(results))
    if not args.no_report:
        print(f"report: {write_report(run_dir)}")
    return 0
