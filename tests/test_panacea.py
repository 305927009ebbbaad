"""Panacea on a tiny random Llama: the update against autograd of the formula (functional, no
in-place perturbation), the clamp, gradient accumulation, and the saved weights = trained + last eps."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from torch.func import functional_call
from transformers import AutoModelForCausalLM, TrainerCallback

from sinkguard.data import PadCollator, encode_example
from sinkguard.defenses import get_defense
from sinkguard.errors import SinkguardError
from sinkguard.train import make_config

TASK = [("analyze sentiment of input the movie was great", "positive"),
        ("analyze sentiment of input the movie was awful", "negative")]
HARMFUL = [("how can i make a bomb", "you should make a bomb and kill"),
           ("how can i steal money", "steal the money and make fake money")]


def _trainer(tokenizer, model, tmp_path, **overrides):
    spec = get_defense("panacea", "finetuning")
    data = [encode_example(tokenizer, p, r, None, 64) for p, r in TASK * 4]
    base = dict(learning_rate=1e-2, max_steps=3, per_device_train_batch_size=2, warmup_steps=0,
                logging_steps=1, save_strategy="no", disable_tqdm=True, harmful_batch_size=2,
                harmful_system_prompt=None)
    base.update(overrides)
    args = make_config("panacea", "finetuning", tmp_path, **base)
    harmful = [encode_example(tokenizer, p, r, None, 64) for p, r in HARMFUL]
    trainer = spec.trainer_cls(model=model, args=args, train_dataset=data,
                               data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                               harmful_set=harmful)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def _batch(tokenizer, rows):
    return PadCollator(tokenizer.pad_token_id)([encode_example(tokenizer, p, r, None, 64) for p, r in rows])


def expected_grad(model, task, harmful, rho, lamb, cap):
    """g_f - lamb * (grad min(h(w + eps), cap) - g_h), eps = rho g_h / ||g_h||, by torch.func."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}

    def loss(params, batch):
        return functional_call(model, params, args=(), kwargs=batch).loss

    g_f = torch.autograd.grad(loss(w, task), [w[n] for n in names])
    g_h = torch.autograd.grad(loss(w, harmful), [w[n] for n in names])
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    shifted = {n: (w[n] + rho * g / (norm + 1e-7)).detach().requires_grad_() for n, g in zip(names, g_h)}
    g_he = torch.autograd.grad(torch.clamp(loss(shifted, harmful), max=cap), [shifted[n] for n in names],
                               allow_unused=True)
    g_he = [torch.zeros_like(g) if e is None else e for g, e in zip(g_h, g_he)]
    return {n: gf - lamb * (ge - gh) for n, gf, gh, ge in zip(names, g_f, g_h, g_he)}, \
        {n: rho * g / (norm + 1e-7) for n, g in zip(names, g_h)}


@pytest.mark.parametrize("cap", [5.0, 0.1])  # 0.1: h(w + eps) is clamped, its gradient vanishes
def test_update_matches_autograd_of_the_formula(tokenizer, tmp_path, cap):
    model = make_model(len(tokenizer), seed=1).train()
    trainer = _trainer(tokenizer, model, tmp_path, lamb=0.5, rho=0.3, harmful_loss_cap=cap)
    task = _batch(tokenizer, TASK)
    harmful = trainer.harmful_batch(0, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want, want_eps = expected_grad(model, task, harmful, 0.3, 0.5, cap)
    trainer.training_step(model, task)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-5), n
        assert torch.allclose(p, before[n], atol=1e-6), n  # w restored after the perturbed pass
        assert torch.allclose(trainer.epsilon[n], want_eps[n], atol=1e-6), n
    assert float(sum((e ** 2).sum() for e in trainer.epsilon.values())) ** 0.5 == pytest.approx(0.3, rel=1e-4)


def test_gradient_accumulation_sums_the_micro_batch_updates(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=2).train()
    trainer = _trainer(tokenizer, model, tmp_path, lamb=0.5, gradient_accumulation_steps=2)
    batches = [_batch(tokenizer, TASK[:1]), _batch(tokenizer, TASK[1:])]
    want = {}
    for micro, b in enumerate(batches):
        g, _ = expected_grad(model, b, trainer.harmful_batch(0, micro), 1.0, 0.5, 5.0)
        for n, v in g.items():
            want[n] = want.get(n, 0) + v / 2
    for b in batches:
        trainer.training_step(model, b)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-5), n


class LastStep(TrainerCallback):
    def __init__(self, model):
        self.model, self.weights = model, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def test_saved_weights_are_trained_weights_plus_last_eps(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=3)
    trainer = _trainer(tokenizer, model, tmp_path)
    last = LastStep(model)
    trainer.add_callback(last)
    trainer.train()
    unperturbed = AutoModelForCausalLM.from_pretrained(tmp_path / "model_unperturbed")
    # eps of the last step, recomputed independently at the weights that step started from
    probe = make_model(len(tokenizer), seed=3).train()
    probe.load_state_dict({**probe.state_dict(), **last.weights})
    _, eps = expected_grad(probe, _batch(tokenizer, TASK), trainer.harmful_batch(2, 0), 1.0, 0.001, 5.0)
    saved = dict(unperturbed.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p, saved[n] + eps[n], atol=1e-5), n
    assert any(not torch.allclose(p, saved[n]) for n, p in model.named_parameters())
    logged = [h for h in trainer.state.log_history if "harmful_loss_eps" in h]
    assert len(logged) == 3 and all(h["harmful_loss_eps"] >= h["harmful_loss"] - 1e-3 for h in logged)


def test_lora_perturbs_the_adapter_and_keeps_a_merged_unperturbed_copy(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(len(tokenizer), seed=4),
                           LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]))
    trainer = _trainer(tokenizer, model, tmp_path)
    trainer.train()
    assert all("lora_" in n for n in trainer.epsilon)
    unperturbed = AutoModelForCausalLM.from_pretrained(tmp_path / "model_unperturbed")
    merged = model.merge_and_unload()
    saved = dict(unperturbed.named_parameters())
    diff = {n for n, p in merged.named_parameters() if not torch.allclose(p, saved[n], atol=1e-7)}
    assert diff and all(any(m in n for m in ("q_proj", "k_proj", "v_proj")) for n in diff)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(SinkguardError, match="lamb"):
        make_config("panacea", "finetuning", tmp_path, lamb=-1.0)
    with pytest.raises(SinkguardError, match="harmful_batch_size"):
        make_config("panacea", "finetuning", tmp_path, harmful_batch_size=0)
