"""RepNoise: representation noising (Rosati et al., 2024), as the Booster repository implements it
(`loss_func/repnoise_loss.py`, run by `RepNoiseTrainer`; the T-Vaccine repository's copy is identical).

    loss = CE_mask(harmless) + beta * mean_l MMD(MLP output of layer l on the harmful batch, noise)
           - alpha * log( (CE_mask(harmful logits) + sum_{h in hidden states} CE_mask(lm_head(norm(h))))
                          / n_hidden_states + 1 )

`CE_mask` is the official masked token loss: the mask marks the tokens where the harmful and the
harmless batch differ (the other batch padded with 0 / truncated to the same shape), labels are
the input ids themselves. The logit lens over every hidden state is the memory hog: here each
(layer, token chunk) term runs under activation checkpointing, so one layer's logits are alive
at a time (see docs/methods/repnoise.md for the measured peak), and only the positions the loss
counts go through the LM head (the zeroed ones add their constant log V).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import SinkguardError
from . import Defense, register
from .booster import HarmfulSetConfig, HarmfulStepTrainer
from .vaccine import decoder_layers

MASK_MODES = ("official", "answer")


@dataclass
class RepNoiseConfig(HarmfulSetConfig):
    """RepNoise's hyper-parameters (defaults: T-Vaccine `script/alignment/Repnoise.sh`)."""

    alpha: float = field(default=0.1, metadata={"help": "weight of the logit-lens ascent term "
                                                        "(official script: alpha 0.1, passed as --rho)"})
    beta: float = field(default=0.001, metadata={"help": "weight of the MMD-to-noise term "
                                                         "(official script: beta 0.001, passed as --lamb)"})
    mask: str = field(default="official", metadata={
        "help": "'official': tokens where the harmful and harmless ids differ, labels = the ids; "
                "'answer': each batch's own answer tokens and labels"})
    lens_checkpoint: bool = field(default=True, metadata={
        "help": "run each logit-lens and MMD term under activation checkpointing (same values, one layer's "
                "logits alive at a time); False: keep every layer's logits like the official code"})
    lens_token_chunk: int = field(default=0, metadata={
        "help": "tokens per logit-lens chunk (0: the whole sequence per layer)"})
    kernel_mul: float = field(default=2.0, metadata={"help": "MMD kernel bandwidth ratio (official 2)"})
    kernel_num: int = field(default=5, metadata={"help": "MMD Gaussian kernels (official 5)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (official 0.1)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule (official cosine)"})
    warmup_steps: float = field(default=0.1, metadata={"help": "warm-up (official warmup_ratio 0.1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise SinkguardError(f"{name} must be a finite number >= 0, got {value}")
        if self.mask not in MASK_MODES:
            raise SinkguardError(f"mask must be one of {', '.join(MASK_MODES)}, not {self.mask!r}")
        if self.lens_token_chunk < 0:
            raise SinkguardError(f"lens_token_chunk must be >= 0, got {self.lens_token_chunk}")
        if self.kernel_num < 1 or not self.kernel_mul > 0:
            raise SinkguardError("kernel_num must be >= 1 and kernel_mul > 0")


# --- the loss terms ---------------------------------------------------------------------------

def mmd(source: torch.Tensor, target: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Official `MMD_loss`: multi-bandwidth Gaussian-kernel MMD between two sets of row vectors,
    bandwidth from the mean pairwise squared distance (no gradient through it)."""
    n = source.size(0) + target.size(0)
    total = torch.cat([source, target], dim=0)
    dist = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    bandwidth = dist.detach().sum() / (n * n - n)
    bandwidth = bandwidth / kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-dist / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    b = source.size(0)
    return torch.mean(kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b])


def pad_or_truncate(ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`ids` zero-padded or cut to the shape of `like` (official `adapt_dimension_b2a`)."""
    rows, cols = like.shape
    out = torch.zeros_like(like)
    r, c = min(rows, ids.size(0)), min(cols, ids.size(1))
    out[:r, :c] = ids[:r, :c]
    return out


def official_targets(ids: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, shifted targets) of the official masked CE: mask = ids differ from the other batch's;
    targets = ids * mask, 0 -> ignored (-100), shifted by one."""
    mask = ids != pad_or_truncate(other, ids)
    labels = ids * mask
    labels = labels.masked_fill(labels == 0, -100)
    return mask, labels[:, 1:]


def answer_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, shifted targets) from the batch's own answer labels (-100 elsewhere)."""
    return labels != -100, labels[:, 1:]


def _ce_sum(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of CE(head(h), targets)."""
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def masked_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, mask: torch.Tensor | None,
              targets: torch.Tensor, vocab_size: int, use_checkpoint: bool = True,
              token_chunk: int = 0) -> torch.Tensor:
    """Mean next-token CE of `head(hidden)` at positions 0..T-2 against `targets` (already shifted),
    logits zeroed where `mask[:, :-1]` is False (official `masked_token_ce_loss`).

    Only the positions with a target and unzeroed logits go through the head (in token chunks, each
    under activation checkpointing when asked): a zeroed position's CE is log(vocab_size) with no
    gradient and an ignored target adds nothing, so value and gradient are the official ones at a
    fraction of the LM-head cost (padding and the prompt prefix both batches share are skipped)."""
    valid = targets != -100
    use = valid if mask is None else valid & mask[:, :-1]
    rows, wanted = hidden[:, :-1][use], targets[use]
    chunk = token_chunk if token_chunk > 0 else max(rows.size(0), 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, rows.size(0), chunk):
        args = (rows[s:s + chunk], wanted[s:s + chunk])
        if use_checkpoint and torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, *args, use_reentrant=False)
        else:
            total = total + _ce_sum(head, *args)
    total = total + (valid & ~use).sum() * math.log(vocab_size)
    return total / valid.sum().clamp(min=1)


def output_embeddings(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise SinkguardError(f"{type(model).__name__} has no output embeddings (LM head) for the logit lens")
    return head


def final_norm(model: nn.Module) -> nn.Module:
    """The decoder's final norm (official: `model.base_model.model.model.norm`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for cand in (getattr(base, "model", None), base.get_decoder() if hasattr(base, "get_decoder") else None):
        norm = getattr(cand, "norm", None)
        if isinstance(norm, nn.Module):
            return norm
    raise SinkguardError(f"cannot find the final norm of {type(base).__name__} (looked for model.norm)")


@contextlib.contextmanager
def capture_mlp_outputs(model: nn.Module):
    """While active, fills {layer index: output of layer.mlp} (official: the `layers.{i}.mlp` activations)."""
    outs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise SinkguardError(f"decoder layer {i} has no `mlp` module; RepNoise noises the MLP outputs")
        handles.append(mlp.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def _hidden_states(model: nn.Module, batch: dict):
    """Forward with every hidden state; the full logits are not needed (the terms recompute them in chunks)."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  output_hidden_states=True, use_cache=False)
    try:
        return model(**kwargs, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        return model(**kwargs)


def repnoise_terms(model: nn.Module, harmful: dict, harmless: dict, *, mask: str = "official",
                   use_checkpoint: bool = True, token_chunk: int = 0, kernel_mul: float = 2.0,
                   kernel_num: int = 5, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The three terms of the official loss: `harmless` (CE on the harmless batch), `noise` (mean over
    layers of the MMD between harmful MLP outputs and Gaussian noise) and `harmful` (the mean of the
    final and logit-lens CEs of the harmful batch, plus 1: the argument of the log)."""
    h_ids, a_ids = harmful["input_ids"], harmless["input_ids"]
    if mask == "official":
        h_mask, h_targets = official_targets(h_ids, a_ids)
        a_mask, a_targets = official_targets(a_ids, h_ids)
        keep_h, keep_a = h_mask, a_mask
    else:
        h_mask, h_targets = answer_targets(harmful["labels"])
        a_mask, a_targets = answer_targets(harmless["labels"])
        keep_h = keep_a = None
    with capture_mlp_outputs(model) as mlp_outs:
        out = _hidden_states(model, harmful)
    n_layers = len(mlp_outs)
    noise = h_ids.new_zeros((), dtype=torch.float32)
    for i in range(n_layers):
        hidden = mlp_outs[i]
        m = h_mask.unsqueeze(-1).to(hidden.dtype)
        gauss = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype, device="cpu").to(hidden.device) \
            if generator is not None else torch.randn_like(hidden)
        gauss = gauss * m
        b = hidden.size(0)

        def term(hid, g, m=m, b=b):
            return mmd((hid * m).reshape(b, -1), g.reshape(b, -1), kernel_mul, kernel_num)

        noise = noise + (checkpoint(term, hidden, gauss, use_reentrant=False)
                         if use_checkpoint and torch.is_grad_enabled() else term(hidden, gauss))
    noise = noise / max(n_layers, 1)
    head, norm = output_embeddings(model), final_norm(model)
    states = out.hidden_states
    # The model's own logits: the LM head on the last hidden state (already normed by the decoder).
    vocab = head.weight.size(0)
    harmful_ce = masked_ce(head, states[-1], keep_h, h_targets, vocab, use_checkpoint, token_chunk)
    lens = [masked_ce(lambda x: head(norm(x)), h, keep_h, h_targets, vocab, use_checkpoint, token_chunk)
            for h in states]
    harmful_term = (harmful_ce + sum(lens)) / len(states) + 1
    a_out = _hidden_states(model, harmless)
    harmless_ce = masked_ce(head, a_out.hidden_states[-1], keep_a, a_targets, vocab, use_checkpoint, token_chunk)
    return {"harmless": harmless_ce, "noise": noise, "harmful": harmful_term}


def repnoise_loss(terms: dict[str, torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """harmless + beta * noise - alpha * log(harmful) (official `rep_noise_loss`)."""
    return terms["harmless"] + beta * terms["noise"] - alpha * torch.log(terms["harmful"])


class RepNoiseTrainer(HarmfulStepTrainer):
    """One forward/backward of the RepNoise loss per micro-batch (harmful batch of the training batch size,
    drawn afresh each step as the official trainer's new data-loader iterator does)."""

    harmful_mode = "fresh"

    def harmful_batch_size(self) -> int:
        return self.args.per_device_train_batch_size

    def defense_step(self, model, params, inputs, harmful, num_items_in_batch=None):
        a = self.args
        with self.compute_loss_context_manager():
            terms = repnoise_terms(model, harmful, inputs, mask=a.mask, use_checkpoint=a.lens_checkpoint,
                                   token_chunk=a.lens_token_chunk, kernel_mul=a.kernel_mul,
                                   kernel_num=a.kernel_num)
            loss = repnoise_loss(terms, a.alpha, a.beta)
        if a.n_gpu > 1:
            loss = loss.mean()
        loss = loss / self.accumulation_steps()
        self.backward(loss)
        self.record("harmless_loss", terms["harmless"])
        self.record("noise_mmd", terms["noise"])
        self.record("harmful_lens_loss", terms["harmful"] - 1)
        return loss.detach()


register(Defense("repnoise", "alignment", RepNoiseConfig, RepNoiseTrainer,
                 "push harmful representations towards noise (MMD) and ascend the harmful logit-lens loss",
                 paper="Rosati et al. 2024, Representation Noising: A Defence Mechanism Against Harmful "
                       "Finetuning",
                 official_code="git-disl/Booster loss_func/repnoise_loss.py; Lslland/T-Vaccine "
                               "script/alignment/Repnoise.sh"))
