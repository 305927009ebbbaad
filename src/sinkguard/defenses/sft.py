"""Plain supervised fine-tuning: the baseline, and the base of every sinkguard trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from ..data.formatting import check_template, drop_system_prompts
from . import Defense, register

# peft LoRA targets when a defense names none: every attention and MLP projection (T-Vaccine scripts).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTConfig(TrainingArguments):
    """TrainingArguments plus the options shared by sinkguard's stages.

    The defaults below are the Surgery scripts' schedule and sinkguard's logging / checkpointing;
    a defense's subclass overrides them with its own official values, and `make_config` only sets
    the stage's settings (lr, batch, epochs, seed, ...) and explicit options on top.
    """

    max_length: int = field(default=512, metadata={"help": "token limit per training example"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "modules a LoRA stage adapts (default: every attention and MLP projection)"},
    )
    lr_scheduler_type: str = field(default="constant", metadata={
        "help": "learning-rate schedule (the Surgery scripts' constant: their --warmup_ratio 0.1 is ignored by it)"})
    warmup_steps: float = field(default=0, metadata={"help": "warm-up steps (a float below 1: share of the run; "
                                                     "official none)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_strategy: str = field(default="steps", metadata={"help": "checkpoint schedule"})
    save_steps: float = field(default=50, metadata={"help": "checkpoint every N steps (run_stage derives it "
                                                    "from the run's length unless set)"})
    save_total_limit: int | None = field(default=1, metadata={"help": "checkpoints kept"})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "experiment trackers"})
    disable_tqdm: bool | None = field(default=False, metadata={"help": "hide the progress bar"})
    seed: int = field(default=43, metadata={"help": "random seed (the CLI's and YAML's default)"})
    template: str = field(default="chat", metadata={
        "help": "row format of the stage's rows and extra sets, chat or alpaca (the stage's `template`)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_template(self.template)
        drop_system_prompts(self, self.template, lambda name: f"option {name}")


class SinkguardTrainer(Trainer):
    """`Trainer` that logs extra per-step metrics (averaged over each logging window).

    Subclasses call `self.record(name, value)` inside `compute_loss`; `defense_inputs` lets a
    defense ask the stage builder for extra data (reference pools, harmful sets).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._extra: dict[str, list[float]] = {}

    @classmethod
    def defense_inputs(cls, args: TrainingArguments, tokenizer, data_root=None) -> dict:
        """Extra constructor kwargs this defense needs (none for SFT)."""
        return {}

    def record(self, name: str, value: float | torch.Tensor) -> None:
        """Remember a scalar to average into the next log line."""
        if isinstance(value, torch.Tensor):
            value = value.detach().float().item()
        self._extra.setdefault(name, []).append(float(value))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            for name, values in self._extra.items():
                logs[name] = round(sum(values) / len(values), 6)
            self._extra.clear()
        super().log(logs, *args, **kwargs)


for _stage in ("alignment", "finetuning"):
    register(Defense("sft", _stage, SFTConfig, SinkguardTrainer, "plain supervised fine-tuning (no defense)",
                     fidelity="baseline"))
