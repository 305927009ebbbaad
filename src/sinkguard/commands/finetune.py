"""`sinkguard finetune`: the fine-tuning stage on a poisoned task set, with or without a defense."""

from __future__ import annotations

import argparse

from .common import add_data_root, add_model


def add_training_args(p: argparse.ArgumentParser, lr: float, epochs: float, batch: int) -> None:
    """Flags shared by `align` and `finetune`."""
    p.add_argument("--samples", type=int, default=1000, help="training rows n (default %(default)s)")
    p.add_argument("--epochs", type=float, default=epochs, help="epochs (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs)")
    p.add_argument("--lr", type=float, default=lr, help="learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch, help="per-device batch (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=512, help="token limit per example")
    p.add_argument("--seed", type=int, default=43)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (merged when saved)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=4.0)
    p.add_argument("--out", required=True, help="output folder (rerun on it to resume)")


def training_overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the shared flags."""
    return dict(
        num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length, seed=args.seed,
    )


def launch(stage: str, args: argparse.Namespace, rows: list[dict], **options) -> int:
    """Run one training stage from parsed flags (shared by `align` and `finetune`)."""
    from ..distributed import is_main_process
    from ..train import run_stage

    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=0.1) if args.lora else None
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    path = run_stage(stage, args.defense, args.model, rows, args.out, lora=lora,
                     system_prompt=args.system_prompt or None, data_root=args.data_root,
                     settings=settings, **training_overrides(args), **options)
    if is_main_process():
        print(f"{stage} done: model saved to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune on a (poisoned) task set with a defense",
                       description="Fine-tuning stage: n rows of which round(p*n) are harmful QA pairs.")
    add_model(p)
    add_data_root(p)
    p.add_argument("--defense", default="sft", help="sft or surgery (default %(default)s)")
    p.add_argument("--task", default="sst2", choices=["sst2", "agnews", "gsm8k", "alpaca"])
    p.add_argument("--attack", default="beavertails", choices=["beavertails", "harmful_qa"])
    p.add_argument("--poison-ratio", type=float, default=0.1, help="share p of harmful rows")
    p.add_argument("--alpha", type=float, default=None, help="Surgery penalty weight (default 300)")
    p.add_argument("--sink-impl", choices=["sdpa", "eager"], default=None,
                   help="Surgery sink statistic: fused SDPA (default) or the official eager path")
    p.add_argument("--system-prompt", default="You are a helpful assistant.")
    add_training_args(p, lr=5e-6, epochs=5, batch=10)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import poisoned_dataset

    rows = poisoned_dataset(args.task, args.samples, args.poison_ratio, args.attack, args.seed, args.data_root)
    options = {name: getattr(args, name) for name in ("alpha", "sink_impl") if getattr(args, name) is not None}
    return launch("finetuning", args, rows, **options)
