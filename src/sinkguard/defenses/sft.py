"""Plain supervised fine-tuning: the baseline, and the base of every sinkguard trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from . import Defense, register


@dataclass
class SFTConfig(TrainingArguments):
    """TrainingArguments plus the options shared by sinkguard's stages."""

    max_length: int = field(default=512, metadata={"help": "token limit per training example"})


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
