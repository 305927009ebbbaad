"""Build and run one stage for a named defense: training (alignment, fine-tuning) or a post-fine-tuning repair.

Full fine-tuning or LoRA (peft); checkpoints in `out/checkpoints` (resumed when present); the
result saved as merged safetensors in `out/model` (a LoRA stage also keeps its unmerged adapter
in `out/adapter`) plus `out/train_log.json`; `out/stage.json` records the settings and inputs
that made the folder (see `sinkguard.stamp`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from . import stamp
from .data import DEFAULT_SYSTEM_PROMPT, PadCollator, encode_example, task_input
from .data.formatting import check_template, drop_system_prompts
from .defenses import get_defense
from .distributed import check_launch, check_trainer, has_accelerator
from .errors import SinkguardError
from .io import write_json
from .models import load_model, load_tokenizer, resolve
from .report import mean_logged_loss

log = logging.getLogger(__name__)

STAGE_OUTPUTS = ("model", "adapter", "model_unperturbed", "checkpoints", "train_log.json", ".model.tmp",
                 ".adapter.tmp")
MAX_POISON_DRIFT = 0.02  # largest |real - asked| poison ratio accepted after dropping rows


def make_config(defense: str, stage: str, out_dir: str | os.PathLike, **overrides):
    """The defense's config dataclass with its own defaults, and only `overrides` set on top.

    `overrides` are the stage's settings (`stage_arguments`) and the user's explicit options; the
    defense's dataclass defaults (its official values) hold for everything else.
    """
    spec = get_defense(defense, stage)
    known = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SinkguardError(f"defense {defense!r} has no option(s) {', '.join(unknown)}")
    base = dict(output_dir=str(Path(out_dir) / "checkpoints"), dataloader_pin_memory=torch.cuda.is_available(),
                # else a CPU-only torchrun launch trains each process alone
                use_cpu=not has_accelerator())
    try:
        return spec.config_cls(**{**base, **overrides})
    except (TypeError, ValueError) as exc:
        raise SinkguardError(f"defense {defense!r} ({stage}): invalid settings: {exc}") from None


def stage_arguments(stage, seed: int) -> dict[str, Any]:
    """TrainingArguments values from a typed stage config (`sinkguard.config.TrainingStage`) and a seed."""
    args = dict(num_train_epochs=stage.epochs, max_steps=stage.max_steps, learning_rate=stage.lr,
                per_device_train_batch_size=stage.batch_size, gradient_accumulation_steps=stage.grad_accum,
                max_length=stage.max_length, seed=seed)
    if stage.save_steps is not None:
        args["save_steps"] = stage.save_steps
    return args


def lora_config(r: int = 8, alpha: float = 4.0, dropout: float = 0.1, target_modules: list[str] | None = None):
    """peft LoRA config (T-Vaccine scripts: r 8, alpha 4, dropout 0.1); targets from the defense's config."""
    from peft import LoraConfig

    from .defenses.sft import LORA_TARGETS

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules or LORA_TARGETS),
                      task_type="CAUSAL_LM")


def tokenize_rows(rows: list[dict], tokenizer, system_prompt: str | None, max_length: int,
                  allow_drop: bool = False, template: str = "chat") -> tuple[list[dict], dict[str, Any]]:
    """Answer-only-loss examples in `template` (chat or alpaca; a row with `instruction` and `input`
    in Alpaca's input variant) and a summary; rows whose prompt fills the budget are dropped.

    When rows carry `harmful`, dropping changes the poison ratio: the real one is reported, and a
    change of more than 0.02 is an error unless `allow_drop`.
    """
    check_template(template)
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise SinkguardError("the model's tokenizer has no chat template, which template chat formats training "
                             "rows with; use template alpaca (the official Llama-2 format) or a model that ships "
                             "one (an -Instruct / -chat model)")
    out, kept = [], []
    for r in rows:
        ex = encode_example(tokenizer, r["prompt"], r["response"], system_prompt, max_length, template,
                            task_input(r))
        if any(label != -100 for label in ex["labels"]):
            out.append(ex)
            kept.append(r)
    if not out:
        raise SinkguardError(f"no training example fits in max_length={max_length} tokens; raise --max-length")
    summary: dict[str, Any] = {"rows": len(rows), "examples": len(out), "dropped": len(rows) - len(out)}
    if any("harmful" in r for r in rows):
        asked = sum(bool(r.get("harmful")) for r in rows) / len(rows)
        real = sum(bool(r.get("harmful")) for r in kept) / len(kept)
        summary.update(poison_ratio_asked=round(asked, 4), poison_ratio_real=round(real, 4))
    if summary["dropped"]:
        log.warning("%d of %d rows dropped: their prompt fills max_length=%d tokens%s", summary["dropped"],
                    len(rows), max_length, f"; real poison ratio {summary['poison_ratio_real']:.3f} (asked "
                    f"{summary['poison_ratio_asked']:.3f})" if "poison_ratio_real" in summary else "")
        if "poison_ratio_real" in summary and abs(real - asked) > MAX_POISON_DRIFT and not allow_drop:
            raise SinkguardError(
                f"{summary['dropped']} of {len(rows)} rows do not fit in max_length={max_length} tokens, which "
                f"moves the poison ratio from {asked:.3f} to {real:.3f}; raise --max-length or pass --allow-drop")
    return out, summary


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step of a Trainer `checkpoint-N` folder."""
    return int(Path(path).name.split("-")[-1])


def last_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` under `out/checkpoints`, to resume from.

    The Trainer writes `trainer_state.json` last, so a folder without it was cut off mid-save (a
    stopped session): it is deleted, and the run resumes from the checkpoint before it.
    """
    ckpt = Path(out_dir) / "checkpoints"
    runs = sorted(ckpt.glob("checkpoint-*"), key=checkpoint_step) if ckpt.is_dir() else []
    while runs and not (runs[-1] / "trainer_state.json").is_file():
        log.warning("deleting %s: its save was cut off (no trainer_state.json)", runs[-1])
        shutil.rmtree(runs.pop())
    return str(runs[-1]) if runs else None


def planned_steps(examples: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps of a single-process run (the Trainer's count)."""
    if max_steps > 0:
        return max_steps
    per_epoch = max(1, math.ceil(examples / batch_size) // grad_accum)
    return max(1, math.ceil(epochs * per_epoch))


def default_save_steps(total_steps: int) -> int:
    """Checkpoint about four times a run (at most every 50 steps), so short CPU runs resume mid-way."""
    return max(1, min(50, math.ceil(total_steps / 4)))


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


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
    overwrite: bool = False,
    allow_drop: bool = False,
    keep_checkpoints: int = 0,
    dtype: str = "float32",
    template: str = "chat",
    **config_overrides,
) -> Path:
    """Train `model_name` on `rows` with `defense`, its weights loaded in `dtype`, the rows (and the
    defense's extra sets) in `template` (chat or alpaca); return the saved model directory `out/model`.

    Rerunning on the same `out_dir` with the same settings and inputs resumes from the last
    checkpoint, or reuses a finished run; other settings are an error unless `overwrite`.
    `keep_checkpoints=N` saves about N evenly spaced checkpoints and keeps their weights after
    training (for `sinkguard analyze --run`); by default checkpoints are deleted once done.
    """
    out = Path(out_dir)
    final = out / "model"
    check_launch()
    spec = get_defense(defense, stage)
    args = make_config(defense, stage, out, template=template, **config_overrides)
    if template == "alpaca" and system_prompt:
        raise SinkguardError("system_prompt needs template chat (the Alpaca prompt has no system turn); "
                             "pass system_prompt=None")
    resolve(model_name)  # an unknown model fails here, before the folder is claimed
    if keep_checkpoints < 0:
        raise SinkguardError(f"keep_checkpoints must be >= 0, got {keep_checkpoints}")
    record = {"stage": stage, "defense": defense, "model": str(model_name), "lora": lora,
              "system_prompt": system_prompt, "allow_drop": allow_drop,
              **({"keep_checkpoints": keep_checkpoints} if keep_checkpoints else {}),
              **({"dtype": dtype} if dtype != "float32" else {}),  # float32 runs keep their earlier records
              **({"template": template} if template != "chat" else {}),  # and chat runs theirs
              **{k: v for k, v in sorted(config_overrides.items())}}
    inputs = {"rows": stamp.digest(rows), "model": stamp.path_fingerprint(model_name)}
    done = stamp.claim(out, record, inputs, STAGE_OUTPUTS, overwrite)
    if done and (final / "config.json").is_file():
        log.info("%s: already trained with these settings, reusing %s", stage, final)
        return final
    tokenizer = load_tokenizer(model_name)
    train_dataset, data_summary = tokenize_rows(rows, tokenizer, system_prompt, args.max_length, allow_drop,
                                                template)
    total = planned_steps(len(train_dataset), args.per_device_train_batch_size,
                          args.gradient_accumulation_steps, args.num_train_epochs, args.max_steps)
    if keep_checkpoints:
        if "save_steps" in config_overrides:
            log.warning("keep_checkpoints=%d sets the checkpoint spacing: save_steps=%s ignored", keep_checkpoints,
                        config_overrides["save_steps"])
        # Data-parallel processes share the rows: each runs about total / world_size steps.
        steps = total if args.max_steps > 0 else max(1, math.ceil(total / max(1, args.world_size)))
        _keep_checkpoints(args, steps, keep_checkpoints)
    elif "save_steps" not in config_overrides:
        args.save_steps = default_save_steps(total)
    model = load_model(model_name, dtype=dtype)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(**lora, target_modules=args.lora_target_modules))
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
            tmp = out / ".adapter.tmp"
            trained.save_pretrained(tmp, safe_serialization=True)
            _replace_dir(tmp, out / "adapter")
            trained = trained.merge_and_unload()
        tmp = out / ".model.tmp"
        trained.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, final)
        mean_loss = mean_logged_loss(trainer.state.log_history)  # the Trainer's own forgets a resume's first part
        write_json(out / "train_log.json", {
            "stage": stage, "defense": defense, "model": str(model_name), **data_summary,
            "lora": lora, "system_prompt": system_prompt, "template": template, "wall_s": round(time.time() - start, 1),
            "train_loss": result.training_loss if mean_loss is None else mean_loss,
            "resumed_at_step": checkpoint_step(resume) if resume else None,
            "settings": settings or {}, "processes": args.world_size,
            "config": {k: v for k, v in args.to_dict().items() if not k.startswith("_")},
            "log_history": trainer.state.log_history,
        })
        if keep_checkpoints:
            _drop_resume_state(out / "checkpoints")
        else:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # optimizer states: GBs, no longer needed
        stamp.finish(out, model="model", wall_s=round(time.time() - start, 1))
    trainer.accelerator.wait_for_everyone()
    return final


def run_post_stage(
    defense: str,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options: dict | None = None,
    adapter_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    template: str = "chat",
) -> Path:
    """Apply a post-fine-tuning defense to `model_dir` into `out_dir`; return the repaired model's folder.

    `template`: the format `model_dir` was fine-tuned with (the defense's calibration rows use it).
    Same reuse rules as `run_stage`: a finished folder with the same settings and inputs is reused.
    """
    from .config import check_options

    spec = get_defense(defense, "post_finetuning")
    options = check_options(defense, "post_finetuning", options or {})
    try:
        config = spec.config_cls(**options)
    except (TypeError, ValueError) as exc:
        raise SinkguardError(f"defense {defense!r} (post_finetuning): invalid settings: {exc}") from None
    check_template(template)
    drop_system_prompts(config, template, lambda name: f"{defense} option {name}")
    out = Path(out_dir)
    record = {"stage": "post_finetuning", "defense": defense, "options": options,
              **({"template": template} if template != "chat" else {})}
    inputs = {"model": stamp.path_fingerprint(model_dir),
              "adapter": stamp.path_fingerprint(adapter_dir) if adapter_dir else "none"}
    done = stamp.claim(out, record, inputs, ("model", "repair_log.json"), overwrite)
    if done and (out / done["finished"]["model"]).is_dir():
        log.info("post_finetuning %s: already applied with these settings, reusing %s", defense, out)
        return out / done["finished"]["model"]
    start = time.time()
    path = Path(spec.apply(Path(model_dir), out, config, data_root=data_root,
                           adapter_dir=Path(adapter_dir) if adapter_dir else None,
                           **({"template": template} if template != "chat" else {})))  # chat: as before
    if not (path / "config.json").is_file():
        raise SinkguardError(f"post-fine-tuning defense {defense!r} returned {path}, which holds no model")
    if not (path / "tokenizer_config.json").is_file():  # the repaired model keeps its tokenizer
        load_tokenizer(str(model_dir)).save_pretrained(path)
    stamp.finish(out, model=os.path.relpath(path, out), wall_s=round(time.time() - start, 1))
    return path


# ---------------------------------------------------------------- kept checkpoints (analysis)
def _keep_checkpoints(args, total_steps: int, count: int) -> None:
    """Save every total/count steps and keep every checkpoint."""
    args.save_strategy = "steps"
    args.save_steps = max(1, total_steps // count)
    args.save_total_limit = None


def _drop_resume_state(folder: Path) -> None:
    """Keep each checkpoint's weights, drop what only a resume needs (optimizer, scheduler, RNG)."""
    for ckpt in folder.glob("checkpoint-*"):
        for name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
            (ckpt / name).unlink(missing_ok=True)
        for rng in ckpt.glob("rng_state*.pth"):
            rng.unlink()
