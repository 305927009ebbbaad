"""T-Vaccine: targeted, memory-efficient Vaccine (Liu et al., 2024; official Lslland/T-Vaccine
`trainer.py` `BaseTrainer`, optimizer name "mesfa").

Every `probability_steps` (K) steps the layers are scored by the L2 norm of the loss gradient with
respect to their attention output on one harmful batch; every `lisa_interval_steps` (J) steps
`lisa_activated_layers` (S) distinct layers are drawn with probability norm / sum of norms. Only the
chosen layers' attention parameters train and only their outputs are perturbed (Vaccine's two-pass
step, global norm over the chosen layers); the other decoder layers run under activation
checkpointing, the source of the memory saving (see docs/methods/tvaccine.md). The last scores and
draw are saved with each checkpoint, so a resumed run scores and draws at the same steps, with the
same results, as an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import DEFAULT_SYSTEM_PROMPT, PadCollator, encode_example, reference_pools
from ..errors import SinkguardError
from . import Defense, register
from .state import CheckpointedStateMixin
from .vaccine import PerturbationTrainer, VaccineConfig

log = logging.getLogger(__name__)


@dataclass
class TVaccineConfig(VaccineConfig):
    """T-Vaccine's hyper-parameters (defaults: official `script/alignment/T-Vaccine.sh` and README)."""

    rho: float = field(default=3.0, metadata={"help": "perturbation intensity (official README: 3)"})
    lisa_activated_layers: int = field(default=8, metadata={"help": "S: layers perturbed and trained at a time"})
    lisa_interval_steps: int = field(default=20, metadata={"help": "J: steps between two layer draws"})
    probability_steps: int = field(default=200, metadata={"help": "K: steps between two layer scorings"})
    prompt_data_size: int = field(default=200, metadata={"help": "harmful (prompt, answer) pairs used for scoring"})
    probability_batch_size: int = field(
        default=1, metadata={"help": "harmful examples per scoring batch (official loader: 1)"}
    )
    train_unselected_mlp: bool = field(
        default=True, metadata={"help": "official: True, the non-attention (MLP) parameters of every layer stay "
                                "trainable; False: they train only in the chosen layers too"}
    )
    checkpoint_unselected: bool = field(
        default=True, metadata={"help": "official: True, layers outside the active set run under activation "
                                "checkpointing (the memory saving); False: no checkpointing"}
    )
    checkpoint_reentrant: bool = field(
        default=True, metadata={"help": "official (torch 2.1 default): reentrant checkpointing, under which the "
                                "checkpointed layers below the lowest un-checkpointed one get no gradient; "
                                "False: exact gradients"}
    )
    previous_layer_threshold: int = field(
        default=26, metadata={"help": "official: with more layers than this, the layer before each chosen one "
                              "also runs without checkpointing"}
    )
    harmful_system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system turn of every harmful scoring example (default: "
                                                 "the fine-tuning rows' prompt; the alignment rows have none "
                                                 "by default; null or '': no system turn; template alpaca: none)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lisa_activated_layers", "lisa_interval_steps", "probability_steps",
                     "prompt_data_size", "probability_batch_size"):
            if getattr(self, name) < 1:
                raise SinkguardError(f"{name} must be >= 1, got {getattr(self, name)}")


class TVaccineTrainer(CheckpointedStateMixin, PerturbationTrainer):
    """T-Vaccine: gradient-norm layer scoring, sampled active layers, perturbation on those only."""

    state_file = "tvaccine_layers"

    multiprocess_unsupported = (
        "it freezes and unfreezes layers (requires_grad) every few steps and runs the others under "
        "reentrant checkpointing, while DDP fixes its gradient buckets and hooks when it wraps the model "
        "(the gradients of re-frozen layers are left undefined); train it in one process"
    )

    def __init__(self, *args, harmful_set: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not harmful_set:
            raise SinkguardError("T-Vaccine needs a non-empty harmful set to score layers")
        self.harmful_set = harmful_set
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        self._pad = PadCollator(pad if pad is not None else 0)
        self.layer_norms: list[float] | None = None
        self.layer_probabilities: list[float] | None = None
        self.active_layers: list[int] | None = None
        self._prepared_step: int | None = None
        self._groups: list[tuple[list[nn.Parameter], list[nn.Parameter]]] | None = None
        self._saved_checkpointing: dict[int, dict] = {}

    @classmethod
    def defense_inputs(cls, args: TVaccineConfig, tokenizer, data_root=None) -> dict:
        """The first `prompt_data_size` rows of the harmful reference pool (unsafe beavertails train)."""
        harmful, _ = reference_pools(data_root)
        if len(harmful) < args.prompt_data_size:
            raise SinkguardError(f"prompt_data_size={args.prompt_data_size} but the harmful pool has "
                                 f"{len(harmful)} rows; lower prompt_data_size")
        rows = [encode_example(tokenizer, r["prompt"], r["response"], args.harmful_system_prompt, args.max_length,
                               args.template) for r in harmful[: args.prompt_data_size]]
        rows = [r for r in rows if any(label != -100 for label in r["labels"])]
        if not rows:
            raise SinkguardError(f"no harmful scoring example fits in max_length={args.max_length} tokens")
        return {"harmful_set": rows}

    def perturbed_layers(self) -> list[int]:
        if self.active_layers is None:
            raise SinkguardError("T-Vaccine has no active layers yet: prepare_step runs first")
        return list(self.active_layers)

    def checkpoint_state(self):
        """The last layer scores and draw: a resume keeps them until the next K / J step, as an
        uninterrupted run does (rescoring at the resume step would change both)."""
        if self.layer_norms is None or self.active_layers is None:
            return None
        return {"layer_norms": torch.tensor(self.layer_norms, dtype=torch.float64),
                "active_layers": torch.tensor(self.active_layers, dtype=torch.long)}, {}

    def restore_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.layer_norms = tensors["layer_norms"].tolist()
        self.layer_probabilities = self.probabilities(self.layer_norms)
        self.active_layers = tensors["active_layers"].tolist()

    # --- layer scoring and selection ---------------------------------------------------------

    def harmful_batch(self, step: int) -> dict[str, torch.Tensor]:
        """`probability_batch_size` harmful examples, drawn reproducibly from the step number."""
        rng = random.Random(self.args.seed * 1_000_003 + step)
        picks = rng.sample(range(len(self.harmful_set)), min(self.args.probability_batch_size, len(self.harmful_set)))
        batch = self._pad([self.harmful_set[i] for i in picks])
        return self._prepare_inputs(batch)

    def score_layers(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
        """Per-layer L2 norm of d loss / d attention output on `batch`, all layers unperturbed and
        un-checkpointed (official `after_gradient_magnitude_step`); parameters are left untouched."""
        self._set_checkpointing(set(range(len(self.layers()))))
        indices = list(range(len(self.layers())))
        with self.capture_output_grads(indices) as grads, self.discarded_param_grads(model):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch)
            self.backward(loss)
        missing = [i for i in indices if i not in grads]
        if missing:
            raise SinkguardError(f"no gradient reached the attention output of layer(s) {missing} when scoring")
        return [float(torch.linalg.vector_norm(grads[i], dtype=torch.float32)) for i in indices]

    @staticmethod
    def probabilities(norms: list[float]) -> list[float]:
        """Layer l is drawn with probability norm_l / sum of norms (official)."""
        total = sum(norms)
        if not (total > 0 and all(n >= 0 and n < float("inf") for n in norms)):
            raise SinkguardError(f"layer gradient norms are not usable probabilities: {norms}")
        return [n / total for n in norms]

    def select_layers(self, probabilities: list[float], step: int) -> list[int]:
        """S distinct layers drawn without replacement with `probabilities`, sorted (reproducible per step)."""
        n = self.args.lisa_activated_layers
        nonzero = sum(p > 0 for p in probabilities)
        if n > nonzero:
            raise SinkguardError(f"lisa_activated_layers={n} but only {nonzero} of {len(probabilities)} layers "
                                 "have a non-zero gradient norm; lower lisa_activated_layers")
        gen = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step + 7)
        picks = torch.multinomial(torch.tensor(probabilities, dtype=torch.float64), n, replacement=False,
                                  generator=gen)
        return sorted(int(i) for i in picks)

    # --- trainable parameters and checkpointing -----------------------------------------------

    def _param_groups(self) -> list[tuple[list[nn.Parameter], list[nn.Parameter]]]:
        """Per layer: (trainable attention params, other trainable params), as trainable at the start."""
        groups = []
        for layer in self.layers():
            attn = {id(p) for p in layer.self_attn.parameters()}
            trainable = [p for p in layer.parameters() if p.requires_grad]
            groups.append(([p for p in trainable if id(p) in attn], [p for p in trainable if id(p) not in attn]))
        return groups

    def _set_trainable(self, active: set[int]) -> None:
        for i, (attn, rest) in enumerate(self._groups):
            for p in attn:
                p.requires_grad_(i in active)
            if not self.args.train_unselected_mlp:
                for p in rest:
                    p.requires_grad_(i in active)

    def _set_checkpointing(self, full_layers: set[int]) -> None:
        """Layers not in `full_layers` run under activation checkpointing (when enabled)."""
        if not self.args.checkpoint_unselected or self.args.gradient_checkpointing:
            return  # off, or the Trainer already checkpoints every layer
        from transformers.modeling_layers import GradientCheckpointingLayer

        func = partial(checkpoint, use_reentrant=self.args.checkpoint_reentrant)
        for i, layer in enumerate(self.layers()):
            if not isinstance(layer, GradientCheckpointingLayer):
                raise SinkguardError(f"{type(layer).__name__} does not support per-layer activation "
                                     "checkpointing; set checkpoint_unselected=False")
            if i not in self._saved_checkpointing:
                self._saved_checkpointing[i] = {k: layer.__dict__[k] for k in
                                                ("gradient_checkpointing", "_gradient_checkpointing_func")
                                                if k in layer.__dict__}
            layer.gradient_checkpointing = i not in full_layers
            layer._gradient_checkpointing_func = func

    def full_layers(self, active: list[int]) -> set[int]:
        """Layers run without checkpointing: the active ones, plus (deep models) the one before each."""
        full = set(active)
        if len(self.layers()) > self.args.previous_layer_threshold:
            full |= {i - 1 for i in active if i > 0}
        return full

    def restore_model(self) -> None:
        """Undo the per-step freezing and checkpointing (the model leaves training as it came)."""
        if self._groups is not None:
            for attn, rest in self._groups:
                for p in attn + rest:
                    p.requires_grad_(True)
        layers = self.layers() if self._saved_checkpointing else []
        for i, saved in self._saved_checkpointing.items():
            for k in ("gradient_checkpointing", "_gradient_checkpointing_func"):
                if k in saved:
                    setattr(layers[i], k, saved[k])
                elif k in layers[i].__dict__:
                    delattr(layers[i], k)
        self._saved_checkpointing.clear()

    def prepare_step(self, model: nn.Module) -> None:
        """Once per optimizer step: rescore every K steps, redraw every J steps, apply the selection."""
        step = self.state.global_step
        if self._prepared_step == step:
            return
        n_layers = len(self.layers())
        if self.args.lisa_activated_layers > n_layers:
            raise SinkguardError(f"lisa_activated_layers={self.args.lisa_activated_layers} exceeds the model's "
                                 f"{n_layers} decoder layers")
        if self._groups is None:
            self._groups = self._param_groups()
        if self.layer_probabilities is None or step % self.args.probability_steps == 0:
            self.layer_norms = self.score_layers(model, self.harmful_batch(step))
            self.layer_probabilities = self.probabilities(self.layer_norms)
            log.info("step %d: layer selection probabilities %s", step,
                     [round(p, 4) for p in self.layer_probabilities])
        if self.active_layers is None or step % self.args.lisa_interval_steps == 0:
            self.active_layers = self.select_layers(self.layer_probabilities, step)
            log.info("step %d: active layers %s", step, self.active_layers)
        self._set_trainable(set(self.active_layers))
        self._set_checkpointing(self.full_layers(self.active_layers))
        self._prepared_step = step

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.restore_model()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.active_layers is not None:
            logs["active_layers"] = ",".join(str(i) for i in self.active_layers)
        super().log(logs, *args, **kwargs)


register(Defense("tvaccine", "alignment", TVaccineConfig, TVaccineTrainer,
                 "targeted Vaccine: perturb and train only gradient-norm-sampled safety-critical layers",
                 paper="Liu et al. 2024, Targeted Vaccine: Safety Alignment for Large Language Models "
                       "against Harmful Fine-Tuning via Layer-wise Perturbation",
                 official_code="Lslland/T-Vaccine"))
