"""Arguments shared by several sub-commands, and the launcher of a training stage."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import TrainingStage, add_config_args


def add_data_root(parser: argparse.ArgumentParser) -> None:
    """`--data-root`: overrides env SINKGUARD_DATA and the default ../shared/data."""
    parser.add_argument(
        "--data-root", default=None,
        help="data folder holding hft/ (default: env SINKGUARD_DATA, else ../shared/data)",
    )


def model_arg(value: str) -> str:
    """argparse type of `--model`: a name no loader can use is a usage error, before torch loads."""
    from ..errors import SinkguardError
    from ..models import check_model

    try:
        return check_model(value)
    except SinkguardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model(parser: argparse.ArgumentParser, default: str | None = "smollm2-135m-instruct") -> None:
    """`--model`: hub id, local directory, .gguf file or bundled alias (checked when parsed)."""
    parser.add_argument(
        "--model", default=default, required=default is None, type=model_arg,
        help="hub id, local directory, .gguf file or bundled alias (default: %(default)s)",
    )


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """`--overwrite`: redo a stage whose folder was made with other settings instead of stopping."""
    parser.add_argument("--overwrite", action="store_true",
                        help="OUT was made with other settings or data: run the stage again there "
                             "(default: stop with the list of differences)")


def add_training_args(p: argparse.ArgumentParser, config_cls: type[TrainingStage]) -> None:
    """Flags of a training stage (`align`, `finetune`): the stage config's fields, seed, output folder."""
    add_config_args(p, config_cls)
    p.add_argument("--seed", type=int, default=43, help="random seed (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder (rerun on it to resume)")
    add_overwrite(p)


def launch(config: TrainingStage, args: argparse.Namespace, rows: list[dict]) -> int:
    """Run one training stage from its typed config (shared by `align` and `finetune`)."""
    from ..distributed import is_main_process
    from ..train import run_stage, stage_arguments

    defense = config.defenses[0]
    settings = {"model": args.model, "seed": args.seed, "data_root": args.data_root,
                **dataclasses.asdict(config)}
    path = run_stage(config.stage, defense, args.model, rows, args.out,
                     lora=dataclasses.asdict(config.lora) if config.lora else None,
                     system_prompt=config.system_prompt or None, template=config.template,
                     data_root=args.data_root, settings=settings,
                     overwrite=args.overwrite, allow_drop=getattr(config, "allow_drop", False),
                     keep_checkpoints=getattr(config, "keep_checkpoints", 0),
                     **stage_arguments(config, args.seed), **config.defense_options(defense))
    if is_main_process():
        print(f"{config.stage} done: model saved to {path}")
    return 0
