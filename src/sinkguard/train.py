"""Build and run one training stage (alignment or fine-tuning) for a named defense.

Full fine-tuning or LoRA (peft); checkpoints in `out/checkpoints` (resumed when present); the
result saved as merged safetensors in `out/model` plus `out/train_log.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .data import PadCollator, encode_example
from .defenses import get_defense
from .distributed import check_launch, check_trainer, has_accelerator
from .errors import SinkguardError
from .models import load_model, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # Surgery scripts' task-data system prompt
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` through a temp file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def make_config(defense: str, stage: str, out_dir: str | os.PathLike, **overrides):
    """The defense's config dataclass with sinkguard's defaults and `overrides` applied."""
    spec = get_defense(defense, stage)
    known = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SinkguardError(f"defense {defense!r} has no option(s) {', '.join(unknown)}")
    base = dict(
        output_dir=str(Path(out_dir) / "checkpoints"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=5e-6,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.1,  # a float below 1 is a ratio of the total steps
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=1,
        report_to=[],
        seed=43,
        disable_tqdm=False,
        use_cpu=not has_accelerator(),  # else a CPU-only torchrun launch trains each process alone
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    base.update(overrides)
    return spec.config_cls(**base)


def lora_config(r: int = 8, alpha: float = 4.0, dropout: float = 0.1):
    """peft LoRA over all attention and MLP projections (T-Vaccine scripts: r 8, alpha 4, dropout 0.1)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")


def tokenize_rows(rows: list[dict], tokenizer, system_prompt: str | None, max_length: int) -> list[dict]:
    """Chat-formatted, answer-only-loss examples; rows whose prompt fills the budget are dropped."""
    out = []
    for r in rows:
        ex = encode_example(tokenizer, r["prompt"], r["response"], system_prompt, max_length)
        if any(label != -100 for label in ex["labels"]):
            out.append(ex)
    if not out:
        raise SinkguardError(f"no training example fits in max_length={max_length} tokens")
    return out


def last_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` under `out/checkpoints`, to resume from."""
    ckpt = Path(out_dir) / "checkpoints"
    runs = sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if ckpt.is_dir() else []
    return str(runs[-1]) if runs else None


def run_stage(
    stage: str,
    defense: str,
    model_name: str,
    rows: list[dict],
    out_dir: str | os.PathLike,
    *,
    lora: dict | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    data_root: str | os.PathLike | None = None,
    settings: dict | None = None,
    **config_overrides,
) -> Path:
    """Train `model_name` on `rows` with `defense`; return the saved model directory `out/model`.

    Rerunning on the same `out_dir` resumes from the last checkpoint; a finished run is reused.
    """
    out = Path(out_dir)
    final = out / "model"
    if (final / "config.json").is_file() and (out / "train_log.json").is_file():
        log.info("%s: already trained, reusing %s", stage, final)
        return final
    check_launch()
    spec = get_defense(defense, stage)
    args = make_config(defense, stage, out, **config_overrides)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(**lora))
    train_dataset = tokenize_rows(rows, tokenizer, system_prompt, args.max_length)
    extra = spec.trainer_cls.defense_inputs(args, tokenizer, data_root)
    trainer = spec.trainer_cls(
        model=model, args=args, train_dataset=train_dataset,
        data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer, **extra,
    )
    check_trainer(trainer)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded and lora is not None:
        raise SinkguardError("merging a LoRA adapter of a sharded (FSDP / DeepSpeed) run is not supported; "
                             "train LoRA under DDP, or full fine-tuning under FSDP / ZeRO-3")
    resume = last_checkpoint(out)
    if resume:
        log.info("resuming %s from %s", stage, resume)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    trained = trainer.model
    # Sharded engines: gather the full weights (a collective, so every rank takes part).
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if trainer.is_world_process_zero():  # one writer; the other ranks wait at the barrier below
        if lora is not None:
            trained = trained.merge_and_unload()
        tmp = out / ".model.tmp"
        trained.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_json(out / "train_log.json", {
            "stage": stage, "defense": defense, "model": str(model_name), "examples": len(train_dataset),
            "lora": lora, "system_prompt": system_prompt, "wall_s": round(time.time() - start, 1),
            "train_loss": result.training_loss, "settings": settings or {}, "processes": args.world_size,
            "config": {k: v for k, v in args.to_dict().items() if not k.startswith("_")},
            "log_history": trainer.state.log_history,
        })
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # optimizer states: GBs, no longer needed
    trainer.accelerator.wait_for_everyone()
    return final
