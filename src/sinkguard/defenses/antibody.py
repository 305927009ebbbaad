"""Antibody (Nguyen et al., 2026, arXiv 2603.00498): a flatness-seeking alignment stage and a
sample-weighted fine-tuning stage. No official code is published: implemented from the paper's
equations as docs/methods/antibody.md gives them ("paper only").

Alignment step (four forward/backward passes):
    g_a = grad a(w); g_h = grad h(w); w_p = w - rho * g_h / ||g_h||
    g_hp = grad h(w_p); g_r = grad r(w_p)          (r: harmful prompt -> refusal text)
    g_s = g_h - g_hp; lambda_t = max(0, (a_t - <g_s, g_a>) / ||g_s||^2)
    grad = g_a + lambda_t * g_s + lambda_r * g_r
With a constant lambda and lambda_r = 0 this is Booster's step.

Fine-tuning step: r_i = log p(y_i | x_i) - log p(refusal | x_i), w = softmax(r / tau) over the
batch (no gradient), loss = sum_i w_i * CE_i; harmful rows, whose refusal the aligned model finds
likelier, get small weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import PadCollator, encode_example
from ..data.formatting import IGNORE_INDEX
from ..errors import SinkguardError
from . import Defense, register
from .booster import QKV_TARGETS, HarmfulSetConfig, HarmfulStepTrainer, flat_dot
from .sft import SFTConfig, SinkguardTrainer

PAPER = ("Nguyen et al. 2026, Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language "
         "Models via Attenuating Harmful Gradient Influence (ICLR 2026)")
# Chosen on the bundled model (docs/methods/antibody.md, benchmarks/antibody_calibration.py).
REFUSAL_TEXT = "I'm sorry, but I cannot assist with that request."


def _check_finite(cfg, names: tuple[str, ...], positive: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(cfg, name)
        ok = math.isfinite(value) and (value > 0 if name in positive else value >= 0)
        if not ok:
            raise SinkguardError(f"{name} must be a finite number {'> 0' if name in positive else '>= 0'}, "
                                 f"got {value}")


@dataclass
class AntibodyAlignmentConfig(HarmfulSetConfig):
    """Antibody's alignment hyper-parameters (no official values: see docs/methods/antibody.md)."""

    rho: float = field(default=0.1, metadata={"help": "size of the simulated harmful step (Booster's alpha)"})
    a_t: float = field(default=0.01, metadata={
        "help": "target of <g_s, update>: lambda_t = max(0, (a_t - <g_s, g_a>) / ||g_s||^2) (chosen here: "
                "lambda_t = Booster's 5 on the median batch of the bundled model)"})
    lambda_r: float = field(default=0.2, metadata={
        "help": "weight of the refusal gradient at the perturbed weights (chosen here: ~||g_a|| / ||g_r||)"})
    refusal_text: str = field(default=REFUSAL_TEXT, metadata={"help": "the refusal the harmful prompts are taught"})
    harmful_batch_size: int = field(default=10, metadata={"help": "harmful examples per step (Booster's 10)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (Booster's 0.1)"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "learning-rate schedule (Booster's)"})
    warmup_steps: float = field(default=0, metadata={"help": "warm-up steps (Booster's: none)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(QKV_TARGETS),
        metadata={"help": "LoRA targets when aligning with LoRA (Booster's: q_proj, k_proj, v_proj)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite(self, ("rho", "lambda_r"))
        if not math.isfinite(self.a_t):
            raise SinkguardError(f"a_t must be a finite number, got {self.a_t}")
        if not self.refusal_text.strip():
            raise SinkguardError("refusal_text must not be empty")
        if self.harmful_batch_size < 1:
            raise SinkguardError(f"harmful_batch_size must be >= 1, got {self.harmful_batch_size}")
        if self.fp16:
            raise SinkguardError("Antibody's lambda_t compares raw gradient inner products, which fp16 loss "
                                 "scaling distorts; use bf16 or fp32")


@dataclass
class AntibodyFinetuningConfig(SFTConfig):
    """Antibody's fine-tuning hyper-parameters (no official values: see docs/methods/antibody.md)."""

    tau: float = field(default=10.0, metadata={"help": "softmax temperature of the sample weights (chosen here: "
                                                      "harmful weight share <= 0.01, most benign rows kept)"})
    refusal_text: str = field(default=REFUSAL_TEXT, metadata={"help": "the refusal whose likelihood each "
                                                                      "sample's answer is compared with"})
    length_normalize: bool = field(default=False, metadata={
        "help": "False: log p is the sum over answer tokens (the paper's log p(y|x)); True: the mean"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite(self, ("tau",), positive=("tau",))
        if not self.refusal_text.strip():
            raise SinkguardError("refusal_text must not be empty")


def refusal_answer_ids(tokenizer, refusal_text: str, template: str = "chat") -> list[int]:
    """Token ids of `refusal_text` as the assistant's answer (what follows the generation prompt)."""
    ex = encode_example(tokenizer, "refusal probe", refusal_text, None, 10**6, template)
    ids = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    if not ids:
        raise SinkguardError(f"refusal_text {refusal_text!r} encodes to no answer token")
    return ids


def with_refusal(batch: dict[str, torch.Tensor], refusal_ids: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Each example's prompt (its tokens before the first answer label) followed by the refusal."""
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        answer = (labels != IGNORE_INDEX).nonzero()
        n_prompt = int(answer[0]) if len(answer) else int(mask.sum())
        prompt = ids[:n_prompt].tolist()
        rows.append({"input_ids": prompt + refusal_ids, "labels": [IGNORE_INDEX] * n_prompt + refusal_ids})
    out = PadCollator(pad_token_id)(rows)
    return {k: v.to(batch["input_ids"].device) for k, v in out.items()}


def sequence_token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token CEs, answer-token count) per example."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return ce.sum(1), (labels != IGNORE_INDEX).sum(1)


def sample_weights(logp_answer: torch.Tensor, logp_refusal: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax((log p(y_i|x_i) - log p(refusal|x_i)) / tau) over the batch, without gradient."""
    return torch.softmax((logp_answer - logp_refusal).detach().float() / tau, dim=0)


def lambda_t(g_s: list[torch.Tensor | None], g_a: list[torch.Tensor | None], a_t: float) -> tuple[float, float, float]:
    """(lambda_t, <g_s, g_a>, ||g_s||^2): lambda_t = max(0, (a_t - <g_s, g_a>) / ||g_s||^2), 0 when g_s = 0."""
    dot, sq = float(flat_dot(g_s, g_a)), float(flat_dot(g_s, g_s))
    return (max(0.0, (a_t - dot) / sq) if sq > 0 else 0.0), dot, sq


class AntibodyAlignmentTrainer(HarmfulStepTrainer):
    """Antibody's alignment step: Booster's flatness term with an adaptive lambda_t, plus a refusal gradient."""

    def __init__(self, *args, refusal_set: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(refusal_set) != len(self.harmful.rows):
            raise SinkguardError("the refusal set must pair one row with each harmful row")
        self.refusal_set = refusal_set

    @classmethod
    def defense_inputs(cls, args: AntibodyAlignmentConfig, tokenizer, data_root=None) -> dict:
        """The harmful set and, row for row, its prompts answered with `refusal_text`."""
        from ..data import defense_harmful_set

        pairs = []
        for r in defense_harmful_set(args.bad_sample_num or None, data_root):
            h = encode_example(tokenizer, r["prompt"], r["response"], args.harmful_system_prompt, args.max_length,
                               args.template)
            s = encode_example(tokenizer, r["prompt"], args.refusal_text, args.harmful_system_prompt,
                               args.max_length, args.template)
            if any(x != IGNORE_INDEX for x in h["labels"]) and any(x != IGNORE_INDEX for x in s["labels"]):
                pairs.append((h, s))
        if not pairs:
            raise SinkguardError(f"no harmful example keeps an answer token within max_length={args.max_length}")
        return {"harmful_set": [h for h, _ in pairs], "refusal_set": [s for _, s in pairs]}

    def refusal_batch(self, harmful_indices: list[int]) -> dict[str, torch.Tensor]:
        return self._prepare_inputs(self.harmful._pad([self.refusal_set[i] for i in harmful_indices]))

    def next_harmful(self) -> dict[str, torch.Tensor]:
        step, k = self._micro
        k = k + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, k)
        idx = self.harmful.indices(self.state.global_step * self.accumulation_steps() + k)
        self._refusal = self.refusal_batch(idx)
        return self._prepare_inputs(self.harmful._pad([self.harmful.rows[i] for i in idx]))

    def defense_step(self, model, params, inputs, harmful, num_items_in_batch=None):
        a, ga = self.args, self.accumulation_steps()
        g_h, loss_h = self.param_grads(model, params, harmful)
        with self.simulated_step(params, g_h, a.rho) as norm:
            g_hp, loss_hp = self.param_grads(model, params, harmful)
            g_r, loss_r = self.param_grads(model, params, self._refusal)
        loss = self.scaled_loss(model, inputs, num_items_in_batch)
        self.backward(loss)
        g_a = [p.grad for p in params]
        g_s = [None if x is None and y is None else
               (x if x is not None else torch.zeros_like(y)) - (y if y is not None else 0)
               for x, y in zip(g_h, g_hp)]
        # The passes' losses are divided by the accumulation steps: lambda_t from per-micro-batch gradients.
        lam, dot, sq = lambda_t([s * ga if s is not None else None for s in g_s],
                                [g * ga if g is not None else None for g in g_a], a.a_t)
        ga_norm = math.sqrt(float(flat_dot(g_a, g_a)))  # before .grad (= g_a) is updated in place
        with torch.no_grad():
            for p, s, r in zip(params, g_s, g_r):
                extra = None
                if s is not None and lam:
                    extra = s * lam
                if r is not None and a.lambda_r:
                    extra = r * a.lambda_r if extra is None else extra.add_(r, alpha=a.lambda_r)
                if extra is not None:
                    p.grad = extra if p.grad is None else p.grad.add_(extra)
        self.record("lambda_t", lam)
        self.record("gs_dot_ga", dot)
        self.record("gs_norm", math.sqrt(sq))
        self.record("harmful_loss", loss_h * ga)
        self.record("harmful_loss_drop", (loss_h - loss_hp) * ga)
        self.record("refusal_loss", loss_r * ga)
        self.record("alignment_grad_norm", ga_norm * ga)
        self.record("refusal_grad_norm", math.sqrt(float(flat_dot(g_r, g_r))) * ga)
        self.record("harmful_grad_norm", norm * ga)
        return loss.detach()


class AntibodyFinetuningTrainer(SinkguardTrainer):
    """Fine-tuning with per-sample weights softmax(r / tau), r = log p(answer) - log p(refusal)."""

    def __init__(self, *args, refusal_ids: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.refusal_ids = refusal_ids
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        self._pad_id = pad if pad is not None else 0
        self.loss_is_scaled_for_ga = False  # a per-micro-batch weighted mean: the Trainer divides by GA

    @classmethod
    def defense_inputs(cls, args: AntibodyFinetuningConfig, tokenizer, data_root=None) -> dict:
        return {"refusal_ids": refusal_answer_ids(tokenizer, args.refusal_text, args.template)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ce_sum, count = sequence_token_losses(model, inputs)
        with torch.no_grad():
            ref_sum, ref_count = sequence_token_losses(model, with_refusal(inputs, self.refusal_ids, self._pad_id))
        if self.args.length_normalize:
            logp, logp_ref = -ce_sum / count.clamp(min=1), -ref_sum / ref_count.clamp(min=1)
        else:
            logp, logp_ref = -ce_sum, -ref_sum
        weights = sample_weights(logp, logp_ref, self.args.tau)
        per_sample = ce_sum / count.clamp(min=1)
        loss = (weights.to(per_sample.dtype) * per_sample).sum()
        self.record("mean_ce", per_sample.mean())
        self.record("weight_max", weights.max())
        self.record("weight_entropy", -(weights * weights.clamp(min=1e-12).log()).sum())
        self.record("likelihood_ratio", (logp - logp_ref).mean())
        return (loss, None) if return_outputs else loss


register(Defense("antibody", "alignment", AntibodyAlignmentConfig, AntibodyAlignmentTrainer,
                 "flat harmful-loss region with adaptive lambda_t plus a refusal gradient (4 passes per step)",
                 paper=PAPER, official_code="", fidelity="paper only"))
register(Defense("antibody", "finetuning", AntibodyFinetuningConfig, AntibodyFinetuningTrainer,
                 "per-sample weights softmax((log p(answer) - log p(refusal)) / tau) on the user's batch",
                 paper=PAPER, official_code="", fidelity="paper only"))
