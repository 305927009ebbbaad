"""Booster on tiny random Llama models: the three-pass gradient against autograd of the formula,
weights restored bit for bit, gradient accumulation, LoRA, reproducible harmful draws, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from torch.func import functional_call

from sinkguard.data import PadCollator, encode_example
from sinkguard.defenses import get_defense
from sinkguard.defenses.harmful import HarmfulBatches
from sinkguard.errors import SinkguardError
from sinkguard.train import make_config

ROWS = [("how can i make a bomb", "sorry i cannot help you"),
        ("how can i steal money", "you should never do that"),
        ("how can i make fake money", "sorry you should never do that"),
        ("how can i kill", "sorry i cannot help")]
HARMFUL = [("how can i make a bomb", "you should make a bomb and kill"),
           ("how can i steal money", "steal the money and kill"),
           ("how can i make fake money", "make fake money this good"),
           ("what to kill", "kill it")]


def encode(tokenizer, rows):
    return [encode_example(tokenizer, p, r, None, 64) for p, r in rows]


def make_trainer(tokenizer, model, tmp_path, defense="booster", **overrides):
    spec = get_defense(defense, "alignment")
    base = dict(learning_rate=1e-2, max_steps=4, per_device_train_batch_size=4, warmup_steps=0,
                logging_steps=1, save_strategy="no", disable_tqdm=True, harmful_batch_size=2)
    if defense == "repnoise":
        base.pop("harmful_batch_size")
    base.update(overrides)
    args = make_config(defense, "alignment", tmp_path, **base)
    extra = {"harmful_set": encode(tokenizer, HARMFUL)}
    if defense == "antibody":
        extra["refusal_set"] = [encode_example(tokenizer, p, args.refusal_text, None, 64) for p, _ in HARMFUL]
    trainer = spec.trainer_cls(model=model, args=args, train_dataset=encode(tokenizer, ROWS * 2),
                               data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                               **extra)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def batch_of(tokenizer, rows=ROWS):
    return PadCollator(tokenizer.pad_token_id)(encode(tokenizer, rows))


def trainable_named(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_grads(model, batch, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss(batch) / d values, by autograd through a functional call with `values` as the weights."""
    leaves = {n: v.detach().clone().requires_grad_() for n, v in values.items()}
    loss = functional_call(model, leaves, args=(), kwargs=dict(batch)).loss
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(leaves.items(), grads)}


def booster_reference(model, batch, harmful, lamb, alpha) -> dict[str, torch.Tensor]:
    """grad a(w) + lamb * (grad h(w) - grad h(w - alpha * g_h / (||g_h|| + 1e-7)))."""
    w = {n: p.detach().clone() for n, p in trainable_named(model).items()}
    g_h = loss_grads(model, harmful, w)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g_h.values())).item()
    w_p = {n: w[n] - alpha * g_h[n] / (norm + 1e-7) for n in w}
    g_hp = loss_grads(model, harmful, w_p)
    g_a = loss_grads(model, batch, w)
    return {n: g_a[n] + lamb * (g_h[n] - g_hp[n]) for n in w}


def test_booster_gradient_is_the_formula_and_weights_are_restored_exactly(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=2, seed=1)
    trainer = make_trainer(tokenizer, model, tmp_path, lamb=5.0, alpha=0.1)
    batch = batch_of(tokenizer)
    harmful = trainer.harmful.batch(0)  # global step 0, first micro-batch
    expected = booster_reference(model, batch, harmful, 5.0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.training_step(model, dict(batch))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} not restored bit for bit"
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)
    plain = loss_grads(model, batch, {n: p.detach() for n, p in model.named_parameters()})
    assert any(not torch.allclose(plain[n], expected[n], atol=1e-5) for n in plain)  # not the SFT step
    logs = trainer._extra
    assert set(logs) >= {"harmful_loss", "harmful_loss_after_step", "harmful_loss_drop", "harmful_grad_norm"}


def test_booster_keeps_earlier_micro_batches_and_scales_for_accumulation(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=2, seed=2)
    trainer = make_trainer(tokenizer, model, tmp_path, lamb=2.0, alpha=0.3, gradient_accumulation_steps=2)
    b1, b2 = batch_of(tokenizer, ROWS[:2]), batch_of(tokenizer, ROWS[2:])
    e1 = booster_reference(model, b1, trainer.harmful.batch(0), 2.0, 0.3)
    e2 = booster_reference(model, b2, trainer.harmful.batch(1), 2.0, 0.3)
    trainer.training_step(model, dict(b1))
    trainer.training_step(model, dict(b2))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (e1[n] + e2[n]) / 2, rtol=1e-4, atol=1e-6)


def test_booster_with_lora_updates_only_the_adapter(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(len(tokenizer), layers=2, seed=3),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                      lora_dropout=0.0, init_lora_weights=False))
    trainer = make_trainer(tokenizer, model, tmp_path)
    batch = batch_of(tokenizer)
    expected = booster_reference(model, batch, trainer.harmful.batch(0), 5.0, 0.1)
    trainer.training_step(model, dict(batch))
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in n
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)
        else:
            assert p.grad is None


def test_harmful_draws_are_reproducible_and_cycle_through_the_set():
    rows = [{"input_ids": [i + 1], "labels": [i + 1]} for i in range(5)]
    cyc = HarmfulBatches(rows, 2, 0, seed=3, mode="cycle")
    assert cyc.indices(7) == HarmfulBatches(rows, 2, 0, seed=3).indices(7)
    first_pass = cyc.indices(0) + cyc.indices(1) + cyc.indices(2)[:1]
    assert sorted(first_pass) == list(range(5))  # every row once per pass
    fresh = HarmfulBatches(rows, 3, 0, seed=3, mode="fresh")
    assert len(set(fresh.indices(4))) == 3 and fresh.indices(4) == fresh.indices(4)
    assert HarmfulBatches(rows, 9, 0, seed=3).batch_size == 5  # never more than the set


def test_booster_resumes_to_the_same_weights(tokenizer, tmp_path):
    straight = make_model(len(tokenizer), layers=2, seed=4)
    make_trainer(tokenizer, straight, tmp_path / "a", max_steps=4).train()
    model = make_model(len(tokenizer), layers=2, seed=4)
    make_trainer(tokenizer, model, tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2,
                 save_total_limit=None).train()
    resumed = make_model(len(tokenizer), layers=2, seed=4)
    trainer = make_trainer(tokenizer, resumed, tmp_path / "b", max_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "checkpoint-2"))
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_short_booster_run_logs_the_regulariser_and_lowers_the_loss(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=2, seed=5)
    trainer = make_trainer(tokenizer, model, tmp_path, max_steps=6)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "harmful_loss_drop" in h]
    assert len(logs) == 6
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_booster_options_are_checked(tokenizer, tmp_path):
    with pytest.raises(SinkguardError, match="lamb"):
        make_config("booster", "alignment", tmp_path, lamb=-1.0)
    with pytest.raises(SinkguardError, match="harmful_batch_size"):
        make_config("booster", "alignment", tmp_path, harmful_batch_size=0)
    with pytest.raises(SinkguardError, match="bad_sample_num"):
        make_config("booster", "alignment", tmp_path, bad_sample_num=-2)
    args = make_config("booster", "alignment", tmp_path)
    assert (args.lamb, args.alpha, args.harmful_batch_size) == (5.0, 0.1, 10)


@pytest.mark.slow
def test_booster_harmful_set_is_the_defense_harmful_set(tokenizer, tmp_path):
    from sinkguard.data import defense_harmful_set

    args = make_config("booster", "alignment", tmp_path, bad_sample_num=50, max_length=64)
    rows = get_defense("booster").trainer_cls.defense_inputs(args, tokenizer)["harmful_set"]
    ref = defense_harmful_set(50)
    assert 0 < len(rows) <= 50
    assert rows[0] == encode_example(tokenizer, ref[0]["prompt"], ref[0]["response"], args.harmful_system_prompt, 64)


@pytest.mark.parametrize("defense", ["booster", "antibody"])
def test_alignment_lora_targets_are_q_k_v_as_official(tokenizer, tmp_path, defense):
    from peft import get_peft_model

    from sinkguard.train import lora_config

    args = make_config(defense, "alignment", tmp_path)
    model = get_peft_model(make_model(len(tokenizer)), lora_config(target_modules=args.lora_target_modules))
    adapted = {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj"}
    assert "o_proj" in make_config(defense, "finetuning" if defense == "antibody" else "alignment", tmp_path,
                                   **({} if defense == "antibody" else {"lora_target_modules": ["o_proj"]})
                                   ).lora_target_modules
