"""Surgery: a fine-tuning-stage defense that regularises the attention-sink divergence.

Each optimisation step adds `alpha * mean_{l,h} relu(sink_harmful - sink_harmless)` to the task
loss, with fresh texts drawn from the provider's harmful and harmless reference pools
(official `SurgeryFinetuningTrainer.training_step`; see docs/methods/surgery.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..data import PadCollator, encode_text, reference_pools
from ..errors import SinkguardError
from ..sink import sink_values, sink_values_eager, surgery_penalty
from . import Defense, register
from .sft import SFTConfig, SinkguardTrainer


class LazyEncoded(Sequence):
    """Rows tokenised on first use: a step only ever touches a few pool texts."""

    def __init__(self, rows: list[dict], encode: Callable[[dict], list[int]]) -> None:
        self.rows, self.encode, self._cache = rows, encode, {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        if i not in self._cache:
            self._cache[i] = self.encode(self.rows[i])
        return self._cache[i]


@dataclass
class SurgeryConfig(SFTConfig):
    """Surgery's hyper-parameters on top of the usual TrainingArguments (defaults: official)."""

    alpha: float = field(default=300.0, metadata={"help": "weight of the sink-divergence penalty"})
    sink_index: int = field(default=0, metadata={"help": "position of the sink token"})
    regularizer_batch_size: int = field(
        default=1, metadata={"help": "harmful and harmless pool texts drawn per step (official: 1)"}
    )
    pool_source: str = field(
        default="beavertails",
        metadata={"help": "reference pools: 'beavertails' (train split) or a JSONL with prompt, response, is_safe"},
    )
    pool_fraction: float = field(
        default=0.5, metadata={"help": "share of the unsafe beavertails train rows kept as the harmful pool"}
    )
    pool_max_length: int = field(default=512, metadata={"help": "token limit of pool texts (official 512)"})
    sink_impl: str = field(
        default="sdpa",
        metadata={"help": "'sdpa': sink column read from the fused SDPA call, decoder-only pool forwards "
                  "(one per pool; same values, faster); 'eager': the official path, output_attentions "
                  "and one full forward per pool"},
    )
    penalty_backward: str = field(
        default="separate",
        metadata={"help": "'separate': backward the penalty's pool passes and the task pass one after the "
                  "other (same gradients; task first in one process, penalty first under DDP; peak memory "
                  "about the larger pass instead of their sum); 'joint': one "
                  "backward of task loss + penalty, as the official code (always used under DeepSpeed)"},
    )
    same_pool_draws: bool = field(
        default=False,
        metadata={"help": "under multi-process training every rank draws the same pool texts (default: "
                  "each rank draws its own, so the penalty averages over world_size x regularizer_batch_size)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_impl not in ("sdpa", "eager"):
            raise SinkguardError(f"sink_impl must be 'sdpa' or 'eager', not {self.sink_impl!r}")
        if self.penalty_backward not in ("separate", "joint"):
            raise SinkguardError(f"penalty_backward must be 'separate' or 'joint', not {self.penalty_backward!r}")
        if self.alpha < 0:
            raise SinkguardError(f"alpha must be >= 0, got {self.alpha}")
        if self.regularizer_batch_size < 1:
            raise SinkguardError("regularizer_batch_size must be >= 1")


class SurgeryTrainer(SinkguardTrainer):
    """Trainer adding Surgery's sink-divergence penalty to the task loss (alpha 0 = plain SFT)."""

    def __init__(self, *args, harmful_pool: Sequence[list[int]], harmless_pool: Sequence[list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        if not harmful_pool or not harmless_pool:
            raise SinkguardError("Surgery needs non-empty harmful and harmless reference pools")
        self.harmful_pool = harmful_pool
        self.harmless_pool = harmless_pool
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        self._pad = PadCollator(pad)
        self._draw_at = (-1, 0)  # (global step, micro-batch) of the next draw
        self.draw_log: list[tuple[int, int, list[int], list[int]]] = []  # (step, micro, harmful, harmless)

    @classmethod
    def defense_inputs(cls, args: SurgeryConfig, tokenizer, data_root=None) -> dict:
        """Tokenised reference pools: (prompt, response) pairs in the stage's template, no system prompt."""
        harmful, harmless = reference_pools(data_root, args.pool_fraction, args.pool_source)

        def encode(row: dict) -> list[int]:
            return encode_text(tokenizer, row["prompt"], row["response"], args.pool_max_length, args.template)

        return {"harmful_pool": LazyEncoded(harmful, encode), "harmless_pool": LazyEncoded(harmless, encode)}

    def _batch(self, rows: list[list[int]], device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self._pad([{"input_ids": ids} for ids in rows]).items()}

    def _draw(self) -> tuple[list[int], list[int]]:
        """Pool indices for this micro-batch, a function of (seed, global step, micro-batch, rank) only.

        No running counter: a run resumed from a checkpoint at step k draws, from step k on, exactly
        the texts the uninterrupted run drew.
        """
        step = self.state.global_step
        micro = self._draw_at[1] if self._draw_at[0] == step else 0
        self._draw_at = (step, micro + 1)
        rank = 0 if self.args.same_pool_draws else self.args.process_index
        rng = random.Random(f"surgery-draw/{self.args.seed}/{step}/{micro}/{rank}")
        n = self.args.regularizer_batch_size
        harmful = rng.sample(range(len(self.harmful_pool)), n)
        harmless = rng.sample(range(len(self.harmless_pool)), n)
        self.draw_log.append((step, micro, harmful, harmless))
        return harmful, harmless

    def sink_divergence_step(self, model) -> torch.Tensor:
        """Tensor[L, H]: sink divergence on freshly drawn pool texts (differentiable)."""
        harmful_idx, harmless_idx = self._draw()
        harmful = [self.harmful_pool[i] for i in harmful_idx]
        harmless = [self.harmless_pool[i] for i in harmless_idx]
        k = self.args.sink_index
        device = next(model.parameters()).device
        if self.args.sink_impl == "eager":
            return sink_values_eager(model, **self._batch(harmful, device), sink_index=k) - sink_values_eager(
                model, **self._batch(harmless, device), sink_index=k
            )
        # One forward per pool (no padding across pools), decoder only (no LM head).
        return sink_values(model, **self._batch(harmful, device), sink_index=k) - sink_values(
            model, **self._batch(harmless, device), sink_index=k
        )

    def penalty(self, model) -> torch.Tensor:
        """alpha * mean relu(divergence) on fresh pool texts, divided by the accumulation steps.

        The division keeps the regulariser's weight independent of gradient accumulation, whether
        or not the Trainer divides the task loss itself (it does not when the loss is already
        normalised by the number of label tokens in the whole accumulated batch).
        """
        divergence = self.sink_divergence_step(model)
        sink_loss = surgery_penalty(divergence)
        self.record("sink_loss", sink_loss)
        self.record("positive_heads", (divergence > 0).sum())
        return self.args.alpha * sink_loss / self.current_gradient_accumulation_steps

    def _separate_backward(self) -> bool:
        # DeepSpeed's engine steps inside every backward: keep one backward per micro-batch there.
        return self.args.penalty_backward == "separate" and not self.is_deepspeed_enabled

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Separate mode: the penalty's pool passes and the task pass are backpropagated one after the
        other, each graph freed before the next pass; the gradients add up in `.grad` exactly as one
        backward of their sum.

        One process: the task pass runs first, so the gradient buffers its backward allocates meet
        only the (decoder-only) pool passes, not the task pass with its LM-head logits. Under DDP the
        penalty runs first: the pool forwards bypass the DDP wrapper (decoder only), so their
        backward is not reduced on its own; the task backward that follows (through DDP)
        all-reduces the accumulated gradient once, and inside the Trainer's `no_sync` window for
        earlier micro-batches it reduces nothing.
        """
        if not (self.args.alpha > 0 and self._separate_backward()):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        task_first = self.accelerator.num_processes == 1
        loss = super().training_step(model, inputs, num_items_in_batch) if task_first else None
        with self.compute_loss_context_manager():
            penalty = self.penalty(model)
        self.accelerator.backward(penalty)
        penalty = penalty.detach()  # frees the pool passes' graph
        if not task_first:
            loss = super().training_step(model, inputs, num_items_in_batch)
        return loss + penalty

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = out if return_outputs else (out, None)
        self.record("task_loss", loss)
        if self.args.alpha > 0 and model.training and not self._separate_backward():
            penalty = self.penalty(model)
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                    self.compute_loss_func is not None)
            if not scaled:  # Trainer divides the whole loss by the accumulation steps: undo it for the penalty
                penalty = penalty * self.current_gradient_accumulation_steps
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss


register(Defense("surgery", "finetuning", SurgeryConfig, SurgeryTrainer,
                 "attention-sink divergence regulariser (fine-tuning stage)",
                 paper="Mitigating Harmful Fine-Tuning for Large Language Models via Attention Sink (2026)",
                 official_code="Lslland/Surgery"))
