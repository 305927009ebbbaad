"""Booster: alignment with a harmful-perturbation-attenuation regulariser (Huang et al., 2024;
official git-disl/Booster `trainer.py` `BoosterAlignmentTrainer.training_step`).

Each step simulates one normalised harmful gradient step and penalises how much it lowers the
harmful loss, to first order:
    g_h  = grad h(w)                          (harmful batch)
    w'   = w - alpha * g_h / (||g_h|| + 1e-7)
    g_h' = grad h(w')                         (same harmful batch), then w is restored
    grad = grad a(w) + lamb * (g_h - g_h')    (alignment batch), one optimizer step
Three forward/backward passes per step (see docs/methods/booster.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.formatting import DEFAULT_SYSTEM_PROMPT
from ..errors import SinkguardError
from . import Defense, register
from .harmful import HarmfulBatches, harmful_rows
from .sft import SFTConfig
from .vaccine import _UNSUPPORTED_OPTIMIZERS, NORM_EPS, PerturbationTrainer, global_norm

QKV_TARGETS = ("q_proj", "k_proj", "v_proj")


@dataclass
class HarmfulSetConfig(SFTConfig):
    """The harmful set shared by Booster, RepNoise and Antibody (alignment stage)."""

    bad_sample_num: int = field(default=0, metadata={
        "help": "harmful (prompt, harmful answer) rows, disjoint from the attack rows; 0 = all available "
                "(426 in the bundled data; official Booster 5000, T-Vaccine's RepNoise 2000)"})
    harmful_system_prompt: str | None = field(default=DEFAULT_SYSTEM_PROMPT, metadata={
        "help": "system prompt of the tokenised harmful rows (the alignment rows' one; "
                "template alpaca: none)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bad_sample_num < 0:
            raise SinkguardError(f"bad_sample_num must be >= 0 (0 = all), got {self.bad_sample_num}")
        if self.optim in _UNSUPPORTED_OPTIMIZERS:
            raise SinkguardError(f"optim={self.optim!r} updates weights inside backward, which breaks the "
                                 "multi-pass step; use an ordinary optimizer such as adamw_torch")


@dataclass
class BoosterConfig(HarmfulSetConfig):
    """Booster's hyper-parameters (defaults: official `script/alignment/smooth_align.sh`)."""

    lamb: float = field(default=5.0, metadata={"help": "lambda: weight of the harmful-loss-drop regulariser "
                                                       "(official flag --lamb, default 5)"})
    alpha: float = field(default=0.1, metadata={"help": "step size of the simulated harmful step "
                                                        "(official flag --alpha, default 0.1)"})
    harmful_batch_size: int = field(default=10, metadata={
        "help": "harmful examples per step (official: 10, fixed in the harmful data loader)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (official 0.1)"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "learning-rate schedule (official constant)"})
    warmup_steps: float = field(default=0, metadata={"help": "warm-up steps (official: none)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(QKV_TARGETS),
        metadata={"help": "LoRA targets when aligning with LoRA (official: q_proj, k_proj, v_proj; r 32, alpha 4)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lamb", "alpha"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise SinkguardError(f"{name} must be a finite number >= 0, got {value}")
        if self.harmful_batch_size < 1:
            raise SinkguardError(f"harmful_batch_size must be >= 1, got {self.harmful_batch_size}")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (requires_grad), in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_dot(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> torch.Tensor:
    """<a, b> over several tensors taken together (float32); None is a zero gradient."""
    total = torch.zeros((), dtype=torch.float32)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + torch.sum(x.float() * y.float()).cpu()
    return total


class HarmfulStepTrainer(PerturbationTrainer):
    """Shared machinery of the harmful-step defenses: a harmful batch per micro-batch, parameter
    gradients of one loss at a time, a simulated step on the weights restored bit for bit.

    Reuses Vaccine's GA-aware `scaled_loss` / `backward`; gradients accumulated by earlier
    micro-batches are kept aside and added back (the official `model.zero_grad()` would drop them).
    """

    harmful_mode = "cycle"

    def __init__(self, *args, harmful_set: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        self.harmful = HarmfulBatches(harmful_set, self.harmful_batch_size(), pad, self.args.seed,
                                      self.harmful_mode)
        self._micro = (-1, 0)  # (global step, micro-batches drawn in it)

    def harmful_batch_size(self) -> int:
        return self.args.harmful_batch_size

    @classmethod
    def defense_inputs(cls, args: HarmfulSetConfig, tokenizer, data_root=None) -> dict:
        """The first `bad_sample_num` rows of the defense harmful set, tokenised."""
        return {"harmful_set": harmful_rows(tokenizer, args.bad_sample_num, args.max_length,
                                            args.harmful_system_prompt, data_root, args.template)}

    def next_harmful(self) -> dict[str, torch.Tensor]:
        """This micro-batch's harmful batch: a function of (seed, global step, micro-batch index)."""
        step, k = self._micro
        k = k + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, k)
        return self._prepare_inputs(self.harmful.batch(self.state.global_step * self.accumulation_steps() + k))

    def param_grads(self, model: nn.Module, params: list[nn.Parameter], inputs: dict,
                    num_items_in_batch=None) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Gradients of the (GA-scaled) loss on `inputs` w.r.t. `params`, taken out of `.grad`; and the loss."""
        loss = self.scaled_loss(model, inputs, num_items_in_batch)
        self.backward(loss)
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return grads, loss.detach()

    @contextlib.contextmanager
    def step_grads(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Inside, `.grad` starts empty; on exit what was left in `.grad` is added to the earlier micro-batches'."""
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        sync = self.accelerator.no_sync(self.model_wrapped) if self.accelerator.num_processes > 1 \
            else contextlib.nullcontext()
        try:
            with sync:
                yield
        finally:
            for p, g in zip(params, saved):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)

    @contextlib.contextmanager
    def simulated_step(self, params: list[nn.Parameter], direction: list[torch.Tensor | None],
                       size: float) -> Iterator[torch.Tensor]:
        """Inside, w = w - size * d / (||d|| + 1e-7); on exit w is restored from a copy (bit-exact).

        Yields ||d||. The official code restores by adding the step back, exact only up to rounding.
        """
        norm = global_norm([d for d in direction if d is not None]) if any(d is not None for d in direction) \
            else torch.zeros(())
        scale = size / (float(norm) + NORM_EPS)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    if d is not None:
                        p.sub_(d.to(p.dtype), alpha=scale)
            yield norm
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            harmful = self.next_harmful()
            params = trainable(model)
            with self.step_grads(params):
                loss = self.defense_step(model, params, inputs, harmful, num_items_in_batch)
            return loss

    def defense_step(self, model: nn.Module, params: list[nn.Parameter], inputs: dict, harmful: dict,
                     num_items_in_batch=None) -> torch.Tensor:
        """Leave this micro-batch's gradient in `.grad`; return the scaled alignment loss."""
        raise NotImplementedError


class BoosterTrainer(HarmfulStepTrainer):
    """Booster's three-pass step: harmful gradient, harmful gradient after the simulated step, alignment."""

    def defense_step(self, model, params, inputs, harmful, num_items_in_batch=None):
        ga = self.accumulation_steps()
        g_h, loss_h = self.param_grads(model, params, harmful)
        with self.simulated_step(params, g_h, self.args.alpha) as norm:
            g_hp, loss_hp = self.param_grads(model, params, harmful)
        loss = self.scaled_loss(model, inputs, num_items_in_batch)
        self.backward(loss)
        lamb = self.args.lamb
        with torch.no_grad():
            for p, a, b in zip(params, g_h, g_hp):
                if a is None and b is None:
                    continue
                diff = (a if a is not None else torch.zeros_like(b)) - (b if b is not None else 0)
                p.grad = lamb * diff if p.grad is None else p.grad.add_(diff, alpha=lamb)
        self.record("harmful_loss", loss_h * ga)
        self.record("harmful_loss_after_step", loss_hp * ga)
        self.record("harmful_loss_drop", (loss_h - loss_hp) * ga)
        self.record("harmful_grad_norm", norm * ga)
        return loss.detach()


register(Defense("booster", "alignment", BoosterConfig, BoosterTrainer,
                 "attenuate the harmful-loss drop of a simulated harmful step (3 passes per step)",
                 paper="Huang et al. 2024, Booster: Tackling Harmful Fine-tuning for Large Language Models "
                       "via Attenuating Harmful Perturbation",
                 official_code="git-disl/Booster"))
