"""Vaccine: perturbation-aware alignment (Huang et al., 2024; official git-disl/Vaccine `trainer.py`).

Each step runs two passes on the same batch. Pass 1 gets `g_l`, the gradient of the loss with
respect to the output of every decoder layer's attention module; pass 2 adds
`e_l = rho * g_l / ||g||` (one L2 norm over all perturbed layers together) to those outputs
through forward hooks, and only pass 2's parameter gradients reach the optimizer
(see docs/methods/vaccine.md). `PerturbationTrainer` is shared with T-Vaccine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.training_args import OptimizerNames

from ..errors import SinkguardError
from . import Defense, register
from .sft import SFTConfig, SinkguardTrainer

NORM_EPS = 1e-7  # official: rho / (||g|| + 1e-7)
_UNSUPPORTED_OPTIMIZERS = (OptimizerNames.LOMO, OptimizerNames.ADALOMO)


@dataclass
class VaccineConfig(SFTConfig):
    """Vaccine's hyper-parameter on top of the usual TrainingArguments (default: official README)."""

    rho: float = field(default=2.0, metadata={"help": "perturbation intensity: global L2 norm of the "
                                              "hidden-state perturbation (official example: 2)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise SinkguardError(f"rho must be a finite number >= 0, got {self.rho}")
        if self.optim in _UNSUPPORTED_OPTIMIZERS:
            raise SinkguardError(f"optim={self.optim!r} updates weights inside backward, which breaks the "
                                 "two-pass perturbation step; use an ordinary optimizer such as adamw_torch")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a (possibly peft/accelerate-wrapped) causal LM, each with a `self_attn`."""
    base = model
    while hasattr(base, "module") and isinstance(base.module, nn.Module):  # DDP-style wrappers
        base = base.module
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    candidates = []
    if hasattr(base, "get_decoder"):
        with contextlib.suppress(Exception):
            candidates.append(base.get_decoder())
    candidates += [getattr(base, "model", None), base]
    for cand in candidates:
        layers = getattr(cand, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
            isinstance(getattr(layer, "self_attn", None), nn.Module) for layer in layers
        ):
            return list(layers)
    raise SinkguardError(
        f"cannot find the decoder layers of {type(base).__name__} (looked for get_decoder().layers and "
        "model.layers, each with a self_attn module); Vaccine/T-Vaccine need a decoder-only transformer"
    )


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, tensor: torch.Tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def perturbation(grads: dict[int, torch.Tensor], rho: float) -> tuple[dict[int, torch.Tensor], float]:
    """`e_l = rho * g_l / (||g|| + 1e-7)` with one L2 norm over all layers; returns (e, ||g||).

    Scales the given tensors in place (they are private copies made by the gradient hooks).
    """
    if not grads:
        raise SinkguardError("no layer to perturb: the perturbation needs at least one attention output")
    total = global_norm(grads.values())
    scale = rho / (total + NORM_EPS)
    return {i: g.mul_(scale.to(g.dtype)) for i, g in grads.items()}, float(total)


def global_norm(tensors) -> torch.Tensor:
    """The L2 norm of several tensors taken together (float32)."""
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors])
    )


class PerturbationTrainer(SinkguardTrainer):
    """The two-pass step shared by Vaccine and T-Vaccine; subclasses choose the perturbed layers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._layers: list[nn.Module] | None = None

    def layers(self) -> list[nn.Module]:
        """The decoder blocks of the model being trained (found once)."""
        if self._layers is None:
            self._layers = decoder_layers(self.model)
        return self._layers

    def perturbed_layers(self) -> list[int]:
        """Indices of the layers whose attention output is perturbed this step (Vaccine: all)."""
        return list(range(len(self.layers())))

    def prepare_step(self, model: nn.Module) -> None:
        """Hook for per-step set-up before the two passes (T-Vaccine: layer scoring and selection)."""

    @contextlib.contextmanager
    def capture_output_grads(self, indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
        """While active, backward fills {index: d loss / d attention output} (copied, detached)."""
        grads: dict[int, torch.Tensor] = {}
        seen: set[int] = set()
        layers = self.layers()

        def make_hook(idx: int):
            def hook(module, args, output):
                # Under activation checkpointing the layer runs twice: keep the run that builds the
                # graph backward goes through (the first one, or the recompute for reentrant checkpointing).
                if idx in seen or not torch.is_grad_enabled():
                    return None
                seen.add(idx)
                out = _first(output)
                replaced = None
                if not out.requires_grad:  # nothing upstream trains: make it a leaf to get its gradient
                    out = out.detach().requires_grad_()
                    replaced = _replace_first(output, out)

                def store(grad: torch.Tensor) -> None:
                    grads[idx] = grad.detach().clone()

                out.register_hook(store)
                return replaced
            return hook

        handles = [layers[i].self_attn.register_forward_hook(make_hook(i)) for i in indices]
        try:
            yield grads
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def add_to_outputs(self, perturb: dict[int, torch.Tensor]) -> Iterator[None]:
        """While active, `perturb[l]` is added to layer l's attention output (a constant: identity gradient)."""
        layers = self.layers()

        def make_hook(idx: int):
            def hook(module, args, output):
                return _replace_first(output, _first(output) + perturb[idx])
            return hook

        handles = [layers[i].self_attn.register_forward_hook(make_hook(i)) for i in perturb]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def discarded_param_grads(self, model: nn.Module) -> Iterator[None]:
        """Parameter gradients made inside are thrown away; those accumulated before are kept.

        The official code runs pass 1's backward then `model.zero_grad()`, which would also erase the
        gradients of earlier micro-batches under gradient accumulation; this keeps them.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        sync = self.accelerator.no_sync(model) if self.accelerator.num_processes > 1 else contextlib.nullcontext()
        try:
            with sync:
                yield
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    def scaled_loss(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The loss exactly as `Trainer.training_step` back-propagates it (GA scaling included)."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if not scaled:
            loss = loss / self.accumulation_steps()
        return loss

    def accumulation_steps(self) -> int:
        """Micro-batches in the current optimizer step (set by the training loop; the config outside it)."""
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def backward(self, loss: torch.Tensor) -> None:
        """`accelerator.backward` with the Trainer's DeepSpeed setting."""
        from accelerate.utils import DistributedType

        kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)

    def output_gradients(self, model: nn.Module, inputs: dict, indices: list[int],
                         num_items_in_batch=None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Pass 1: forward/backward on `inputs`; returns ({l: g_l}, the scaled loss) and no param grads."""
        with self.capture_output_grads(indices) as grads, self.discarded_param_grads(model):
            loss = self.scaled_loss(model, inputs, num_items_in_batch)
            self.backward(loss)
        missing = [i for i in indices if i not in grads]
        if missing:
            raise SinkguardError(f"no gradient reached the attention output of layer(s) {missing}; "
                                 "the loss must depend on every perturbed layer")
        return grads, loss.detach()

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            self.prepare_step(model)
            indices = self.perturbed_layers()
            grads, clean = self.output_gradients(model, inputs, indices, num_items_in_batch)
            perturb, grad_norm = perturbation(grads, self.args.rho)
            self.record("clean_loss", clean * self.accumulation_steps())
            self.record("output_grad_norm", grad_norm)
            self.record("perturbation_norm", global_norm(perturb.values()))
            with self.add_to_outputs(perturb):
                loss = self.scaled_loss(model, inputs, num_items_in_batch)
                self.backward(loss)
            return loss.detach()


class VaccineTrainer(PerturbationTrainer):
    """Vaccine: every decoder layer's attention output is perturbed (official `Vaccine` trainer)."""


register(Defense("vaccine", "alignment", VaccineConfig, VaccineTrainer,
                 "perturbation-aware alignment: adversarial hidden-state perturbation on every layer",
                 paper="Huang et al. 2024, Vaccine: Perturbation-aware Alignment for Large Language Models",
                 official_code="git-disl/Vaccine"))
