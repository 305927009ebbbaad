"""Lisa: Lazy Safety Alignment (Huang et al., 2024; official git-disl/Lisa `trainer.py` `LisaTrainer`).

Fine-tuning alternates between an alignment state (K1 optimizer steps on batches of the refusal
set; the user's batch of that step is not used) and a fine-tuning state (K2 steps on the user's
batches). After the first `proximal_warmup_ratio` of the run, every step adds the proximal term
`rho / 2 * ||w - anchor||^2`, the anchor being the trainable weights at the last state switch
(see docs/methods/lisa.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..data import PadCollator, alignment_dataset, encode_example, load_source, task_input
from ..errors import SinkguardError
from . import Defense, register
from .sft import SFTConfig, SinkguardTrainer
from .state import BatchStream, CheckpointedStateMixin

log = logging.getLogger(__name__)

ALIGN, FINETUNE = "alignment", "finetune"


@dataclass
class LisaConfig(SFTConfig):
    """Lisa's hyper-parameters (defaults: official `script/finetune/lisa_poison_ratio.sh`)."""

    alignment_steps: int = field(default=100, metadata={"help": "K1: optimizer steps per alignment state"})
    finetune_steps: int = field(default=900, metadata={"help": "K2: optimizer steps per fine-tuning state"})
    rho: float = field(default=1.0, metadata={"help": "proximal weight (official 1; Booster's Lisa baseline 0.01)"})
    proximal_warmup_ratio: float = field(
        default=0.1, metadata={"help": "no proximal term during this share of the run's steps (official 0.1)"}
    )
    guide_data_num: int | None = field(
        default=None, metadata={"help": "alignment rows, the first of the refusal set (official 10,000 "
                                "BeaverTails safe rows; None: the whole refusal set, 2,483 rows)"}
    )
    alignment_system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt of the alignment rows (default none, as sinkguard's "
                                "alignment stage)"}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "LoRA targets when fine-tuning with LoRA (official: q_proj, v_proj; r 8, alpha 4)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alignment_steps < 0 or self.finetune_steps < 0 or self.alignment_steps + self.finetune_steps == 0:
            raise SinkguardError("alignment_steps and finetune_steps must be >= 0 and not both 0, got "
                                 f"{self.alignment_steps} and {self.finetune_steps}")
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise SinkguardError(f"rho must be a finite number >= 0, got {self.rho}")
        if not 0 <= self.proximal_warmup_ratio <= 1:
            raise SinkguardError(f"proximal_warmup_ratio must be in [0, 1], got {self.proximal_warmup_ratio}")
        if self.guide_data_num is not None and self.guide_data_num < 1:
            raise SinkguardError(f"guide_data_num must be >= 1, got {self.guide_data_num}")


def lisa_phase(step: int, k1: int, k2: int) -> tuple[str, int]:
    """(state, first step of that state's current run) at optimizer step `step` (0-based).

    Equals the official clock: steps 0..K1-1 align, K1..K1+K2-1 fine-tune, then again.
    """
    if k2 == 0:
        return ALIGN, 0
    if k1 == 0:
        return FINETUNE, 0
    cycle, pos = divmod(step, k1 + k2)
    start = cycle * (k1 + k2)
    return (ALIGN, start) if pos < k1 else (FINETUNE, start + k1)


def alignment_steps_before(step: int, k1: int, k2: int) -> int:
    """How many of the steps 0..step-1 were alignment steps."""
    if k2 == 0:
        return step
    if k1 == 0:
        return 0
    cycle, pos = divmod(step, k1 + k2)
    return cycle * k1 + min(pos, k1)


class LisaTrainer(CheckpointedStateMixin, SinkguardTrainer):
    """Alternating alignment / fine-tuning states with a proximal term to the last switch's weights."""

    state_file = "lisa_anchor"

    def __init__(self, *args, alignment_set: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not alignment_set and self.args.alignment_steps > 0:
            raise SinkguardError("Lisa needs a non-empty alignment set")
        self.alignment_set = alignment_set
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        self._pad = PadCollator(pad if pad is not None else 0)
        self.anchor: dict[str, torch.Tensor] | None = None
        self.anchor_start: int | None = None
        self.lisa_state: str | None = None
        self._micro = (-1, 0)
        self._stream = BatchStream(len(alignment_set), self.args.per_device_train_batch_size, self.args.seed)
        self._warned = False

    @classmethod
    def defense_inputs(cls, args: LisaConfig, tokenizer, data_root=None) -> dict:
        """The first `guide_data_num` rows of the refusal set, tokenised as the alignment stage does."""
        n = args.guide_data_num
        if n is None:
            n = len(load_source("refusals", "train", data_root))
        rows = alignment_dataset(n, data_root, keep_input=args.template == "alpaca")
        encoded = [encode_example(tokenizer, r["prompt"], r["response"], args.alignment_system_prompt,
                                  args.max_length, args.template, task_input(r)) for r in rows]
        encoded = [e for e in encoded if any(label != -100 for label in e["labels"])]
        if not encoded:
            raise SinkguardError(f"no alignment example fits in max_length={args.max_length} tokens")
        return {"alignment_set": encoded}

    # --- schedule ----------------------------------------------------------------------------

    def phase(self, step: int) -> tuple[str, int]:
        return lisa_phase(step, self.args.alignment_steps, self.args.finetune_steps)

    def proximal_active(self, step: int) -> bool:
        """Official: no proximal term while step <= 0.1 x the run's total steps."""
        return self.args.rho > 0 and step > self.args.proximal_warmup_ratio * self.state.max_steps

    def alignment_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The alignment batch of micro-batch `micro` of step `step`: numbered by how many alignment
        micro-batches came before it, so a resumed run draws the same ones."""
        number = alignment_steps_before(step, self.args.alignment_steps, self.args.finetune_steps) \
            * self.args.gradient_accumulation_steps + micro
        return self._pad([self.alignment_set[i] for i in self._stream.indices(number)])

    # --- anchor ------------------------------------------------------------------------------

    def trainable(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def _ensure_anchor(self, model, step: int) -> None:
        """Take the anchor at the first step of each state (the official switch); keep it within."""
        _, start = self.phase(step)
        if self.anchor_start == start and self.anchor is not None:
            return
        if step != start:
            raise SinkguardError(f"Lisa resumed at step {step} inside a state that began at step {start} "
                                 "without its anchor weights; restart the stage from scratch")
        new = {n: p.detach().clone() for n, p in self.trainable(model)}
        if self.anchor is not None:
            drift = sum(float((new[n] - a).pow(2).sum()) for n, a in self.anchor.items())
            log.info("Lisa: step %d switch to %s; squared drift since the last switch %.6g",
                     step, self.phase(step)[0], drift)
        self.anchor, self.anchor_start = new, start

    def proximal(self, model) -> torch.Tensor:
        """rho / 2 * sum over trainable tensors of ||w - anchor||^2 (differentiable)."""
        terms = [(p - self.anchor[n].to(p.device)).pow(2).sum() for n, p in self.trainable(model)]
        return self.args.rho / 2 * torch.stack(terms).sum()

    def checkpoint_state(self):
        if self.anchor is None:
            return None
        return self.anchor, {"anchor_start": str(self.anchor_start)}

    def restore_state(self, tensors, metadata) -> None:
        self.anchor, self.anchor_start = tensors, int(metadata["anchor_start"])

    # --- step --------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
        if not self._warned:
            self._warned = True
            cycle = self.args.alignment_steps + self.args.finetune_steps
            if self.args.alignment_steps >= self.state.max_steps:
                raise SinkguardError(
                    f"Lisa: alignment_steps (K1 = {self.args.alignment_steps}) >= the run's {self.state.max_steps} "
                    "steps: every step would be an alignment step and the model would never see the fine-tuning "
                    "data; scale K1 / K2 to the run, e.g. options: {lisa: {alignment_steps: 2, finetune_steps: 8}} "
                    "for 20 steps")
            if cycle > self.state.max_steps:
                log.warning("Lisa: alignment_steps + finetune_steps = %d exceeds the run's %d steps; the run "
                            "never completes one alignment/fine-tuning cycle (lower K1/K2)", cycle,
                            self.state.max_steps)
        self._ensure_anchor(model, step)
        self.lisa_state = self.phase(step)[0]
        if self.lisa_state == ALIGN:
            # The user's batch of this step is dropped (official); the alignment batch is a per-batch mean.
            inputs, num_items_in_batch = self.alignment_batch(step, self._micro[1]), None
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training or self.lisa_state is None:
            return out
        loss, outputs = out if return_outputs else (out, None)
        self.record("alignment_loss" if self.lisa_state == ALIGN else "task_loss", loss)
        self.record("lisa_alignment", float(self.lisa_state == ALIGN))
        if self.proximal_active(self.state.global_step):
            prox = self.proximal(model)
            self.record("proximal", prox)
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            if scaled:
                prox = prox / self.current_gradient_accumulation_steps
            loss = loss + prox
        else:
            self.record("proximal", 0.0)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.lisa_state is not None:
            logs["lisa_state"] = self.lisa_state
        super().log(logs, *args, **kwargs)


register(Defense("lisa", "finetuning", LisaConfig, LisaTrainer,
                 "lazy safety alignment: alternate alignment and fine-tuning steps with a proximal term",
                 paper="Huang et al. 2024, Lisa: Lazy Safety Alignment for Large Language Models against "
                       "Harmful Fine-tuning Attack (NeurIPS 2024)",
                 official_code="git-disl/Lisa"))
