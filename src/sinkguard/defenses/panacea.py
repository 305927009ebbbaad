"""Panacea: an optimised post-fine-tuning perturbation (Wang et al., 2025; official w-yibo/Panacea
`trainer.py` class `Panacea`, `train.py` adds eps after training).

Each step: g_f = grad f(w) on the user's batch, g_h = grad h(w) on a harmful batch,
eps = rho * g_h / ||g_h||, g_h_eps = grad min(h(w + eps), 5), and the optimizer receives
g_f - lambda * (g_h_eps - g_h). After training the last step's eps is added to the weights: the
saved model is the perturbed one; the unperturbed model is saved beside it (docs/methods/panacea.md).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import DEFAULT_SYSTEM_PROMPT, PadCollator, defense_harmful_set, encode_example
from ..errors import SinkguardError
from . import Defense, register
from .sft import SFTConfig, SinkguardTrainer
from .state import BatchStream, CheckpointedStateMixin
from .vaccine import global_norm

log = logging.getLogger(__name__)

NORM_EPS = 1e-7  # official: eps_rho / (||g_h|| + 1e-7)


@dataclass
class PanaceaConfig(SFTConfig):
    """Panacea's hyper-parameters (defaults: official `script/finetune/panacea_gsm8k.sh`)."""

    rho: float = field(default=1.0, metadata={"help": "eps_rho: L2 norm of the weight perturbation eps (official 1)"})
    lamb: float = field(default=0.001, metadata={"help": "lambda: weight of the harmful-loss increase (official 0.001)"})
    harmful_samples: int | None = field(
        default=None, metadata={"help": "harmful (prompt, answer) rows, disjoint from the attack rows (official "
                                "1,000; None: all that the data allows, 426 BeaverTails train rows here)"}
    )
    harmful_batch_size: int = field(default=10, metadata={"help": "harmful rows per step (official: 10)"})
    harmful_loss_cap: float = field(
        default=5.0, metadata={"help": "h(w + eps) is clamped at this value (official 5; no gradient above it)"}
    )
    harmful_system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system prompt of the harmful rows (as the task rows; "
                                                 "template alpaca: none)"}
    )
    add_perturbation: bool = field(
        default=True, metadata={"help": "official: True, the saved model carries the last eps; False: save the "
                                "trained weights as they are"}
    )
    unperturbed_dir: str | None = field(
        default=None, metadata={"help": "where the model without eps is saved (default: model_unperturbed "
                                "beside the stage's model folder)"}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        metadata={"help": "LoRA targets when fine-tuning with LoRA (official: q, k, v; r 32, alpha 4, dropout 0)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rho", "lamb", "harmful_loss_cap"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise SinkguardError(f"{name} must be a finite number >= 0, got {value}")
        if self.harmful_batch_size < 1:
            raise SinkguardError(f"harmful_batch_size must be >= 1, got {self.harmful_batch_size}")
        if self.harmful_samples is not None and self.harmful_samples < 1:
            raise SinkguardError(f"harmful_samples must be >= 1, got {self.harmful_samples}")


class PanaceaTrainer(CheckpointedStateMixin, SinkguardTrainer):
    """Fine-tuning with Panacea's three-pass step; the last eps is added to the weights after training."""

    state_file = "panacea_eps"

    def __init__(self, *args, harmful_set: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not harmful_set:
            raise SinkguardError("Panacea needs a non-empty harmful set")
        self.harmful_set = harmful_set
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        self._pad = PadCollator(pad if pad is not None else 0)
        self._stream = BatchStream(len(harmful_set), min(self.args.harmful_batch_size, len(harmful_set)),
                                   self.args.seed)
        self.epsilon: dict[str, torch.Tensor] | None = None
        self._micro = (-1, 0)

    @classmethod
    def defense_inputs(cls, args: PanaceaConfig, tokenizer, data_root=None) -> dict:
        """The defense harmful set (BeaverTails train rows no attack row uses), tokenised as the task rows."""
        rows = defense_harmful_set(args.harmful_samples, data_root)
        encoded = [encode_example(tokenizer, r["prompt"], r["response"], args.harmful_system_prompt,
                                  args.max_length, args.template) for r in rows]
        encoded = [e for e in encoded if any(label != -100 for label in e["labels"])]
        if not encoded:
            raise SinkguardError(f"no harmful example fits in max_length={args.max_length} tokens")
        return {"harmful_set": encoded}

    def harmful_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        number = step * self.args.gradient_accumulation_steps + micro
        return self._prepare_inputs(self._pad([self.harmful_set[i] for i in self._stream.indices(number)]))

    def _loss(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The loss as Trainer back-propagates it (divided by the accumulation steps unless already scaled)."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def _grads(self, params, loss: torch.Tensor) -> list[torch.Tensor]:
        """Back-propagate `loss`; return (and clear) the parameter gradients it made."""
        self.accelerator.backward(loss)
        out = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        harmful = self.harmful_batch(step, self._micro[1])
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        earlier = [p.grad for p in params]  # gradients of earlier micro-batches of this step
        for p in params:
            p.grad = None
        sync = self.accelerator.no_sync(model) if self.accelerator.num_processes > 1 else contextlib.nullcontext()
        with sync:
            loss_f = self._loss(model, inputs, num_items_in_batch)
            g_f = self._grads(params, loss_f)
            loss_h = self._loss(model, harmful)
            g_h = self._grads(params, loss_h)
        norm = global_norm(g_h)
        scale = self.args.rho / (norm + NORM_EPS)
        eps = [g.detach().mul(scale.to(g.dtype)) for g in g_h]  # a copy: the official eps aliases the grad
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        try:
            loss_h_eps = torch.clamp(self._loss(model, harmful), max=self.args.harmful_loss_cap
                                     / self.current_gradient_accumulation_steps)
            g_h_eps = self._grads(params, loss_h_eps)
        finally:
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
        for p, old, gf, gh, ghe in zip(params, earlier, g_f, g_h, g_h_eps):
            grad = gf - self.args.lamb * (ghe - gh)
            p.grad = grad if old is None else old + grad
        self.epsilon = {n: e for (n, _), e in zip(named, eps)}
        ga = self.current_gradient_accumulation_steps
        self.record("task_loss", loss_f.detach() * ga)
        self.record("harmful_loss", loss_h.detach() * ga)
        self.record("harmful_loss_eps", loss_h_eps.detach() * ga)
        self.record("harmful_grad_norm", norm)
        return loss_f.detach()

    def checkpoint_state(self):
        return None if self.epsilon is None else (self.epsilon, {})

    def restore_state(self, tensors, metadata) -> None:
        self.epsilon = tensors

    def train(self, *args, **kwargs):
        """Train, save the unperturbed model beside the stage's model, then add the last eps."""
        result = super().train(*args, **kwargs)
        if self.args.add_perturbation:
            if self.epsilon is None:
                raise SinkguardError("Panacea ran no training step: there is no perturbation to add")
            self.save_unperturbed(self.unperturbed_dir())
            self.apply_perturbation()
        return result

    def unperturbed_dir(self) -> Path:
        """`unperturbed_dir`, else `<stage>/model_unperturbed` (the checkpoints live in `<stage>/checkpoints`)."""
        return Path(self.args.unperturbed_dir or Path(self.args.output_dir).parent / "model_unperturbed")

    def save_unperturbed(self, dest: Path) -> None:
        """The trained weights without eps, as safetensors (LoRA merged into a copy), written atomically."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        log.info("Panacea: unperturbed model saved to %s", dest)

    def apply_perturbation(self) -> None:
        """w <- w + eps_last on the trainable weights (official `train.py`, tag eps)."""
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.epsilon:
                    p.add_(self.epsilon[n].to(p.device, p.dtype))
        log.info("Panacea: last perturbation (norm %.4g) added to the weights",
                 float(global_norm(self.epsilon.values())))


register(Defense("panacea", "finetuning", PanaceaConfig, PanaceaTrainer,
                 "optimised weight perturbation against harmful-loss increase, added after fine-tuning",
                 paper="Wang et al. 2025, Panacea: Mitigating Harmful Fine-tuning for Large Language Models "
                       "via Post-fine-tuning Perturbation",
                 official_code="w-yibo/Panacea"))
