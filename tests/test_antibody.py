"""Antibody on tiny random Llama models: lambda_t and the alignment gradient against the paper's
formulas (autograd), the fine-tuning stage's sample weights and weighted loss against a direct
computation, the refusal batches, both registry entries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from test_booster import HARMFUL, ROWS, batch_of, encode, loss_grads, make_trainer, trainable_named

from sinkguard.data import PadCollator, encode_example
from sinkguard.defenses import get_defense, stages_of
from sinkguard.defenses.antibody import lambda_t, refusal_answer_ids, sample_weights, with_refusal
from sinkguard.errors import SinkguardError
from sinkguard.train import make_config

REFUSAL = "sorry i cannot help"


def test_lambda_t_is_the_projection_formula():
    g_s = [torch.tensor([1.0, 2.0]), torch.tensor([2.0])]
    g_a = [torch.tensor([-1.0, 0.5]), None]  # None: a parameter the loss does not reach
    lam, dot, sq = lambda_t(g_s, g_a, a_t=3.0)
    assert (dot, sq) == (0.0, 9.0)
    assert lam == pytest.approx((3.0 - 0.0) / 9.0)
    assert lambda_t(g_s, [torch.tensor([4.0, 4.0]), torch.tensor([1.0])], a_t=3.0)[0] == 0.0  # clipped at 0
    assert lambda_t([torch.zeros(2)], [torch.ones(2)], a_t=1.0)[0] == 0.0  # g_s = 0: no regulariser


def antibody_reference(model, batch, harmful, refusal, rho, a_t, lambda_r):
    w = {n: p.detach().clone() for n, p in trainable_named(model).items()}
    g_h = loss_grads(model, harmful, w)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_h.values()))
    w_p = {n: w[n] - rho * g_h[n] / (norm + 1e-7) for n in w}
    g_hp = loss_grads(model, harmful, w_p)
    g_r = loss_grads(model, refusal, w_p)
    g_a = loss_grads(model, batch, w)
    g_s = {n: g_h[n] - g_hp[n] for n in w}
    gs = torch.cat([v.flatten() for v in g_s.values()]).double()
    ga = torch.cat([v.flatten() for v in g_a.values()]).double()
    lam = max(0.0, float((a_t - gs @ ga) / (gs @ gs)))
    return {n: g_a[n] + lam * g_s[n] + lambda_r * g_r[n] for n in w}, lam


@pytest.mark.parametrize("a_t,lambda_r", [(0.5, 1.0), (-1e6, 0.0), (20.0, 0.3)])
def test_alignment_gradient_is_the_formula(tokenizer, tmp_path, a_t, lambda_r):
    model = make_model(len(tokenizer), layers=2, seed=1)
    trainer = make_trainer(tokenizer, model, tmp_path, "antibody", rho=0.2, a_t=a_t, lambda_r=lambda_r,
                           refusal_text=REFUSAL)
    batch = batch_of(tokenizer)
    idx = trainer.harmful.indices(0)
    harmful = PadCollator(tokenizer.pad_token_id)([trainer.harmful.rows[i] for i in idx])
    refusal = PadCollator(tokenizer.pad_token_id)(
        [encode_example(tokenizer, HARMFUL[i][0], REFUSAL, None, 64) for i in idx])
    expected, lam = antibody_reference(model, batch, harmful, refusal, 0.2, a_t, lambda_r)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.training_step(model, dict(batch))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)
    assert trainer._extra["lambda_t"][0] == pytest.approx(lam, rel=1e-4, abs=1e-9)
    if a_t < -1e5:
        assert lam == 0.0  # lambda_t clipped, no refusal term: the plain alignment gradient
        plain = loss_grads(model, batch, {n: p.detach() for n, p in model.named_parameters()})
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6)


def test_alignment_lambda_t_uses_per_micro_batch_gradients_under_accumulation(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=2, seed=2)
    trainer = make_trainer(tokenizer, model, tmp_path, "antibody", rho=0.2, a_t=0.5, lambda_r=0.5,
                           refusal_text=REFUSAL, gradient_accumulation_steps=2)
    batch = batch_of(tokenizer, ROWS[:2])
    idx = trainer.harmful.indices(0)
    harmful = PadCollator(tokenizer.pad_token_id)([trainer.harmful.rows[i] for i in idx])
    refusal = PadCollator(tokenizer.pad_token_id)(
        [encode_example(tokenizer, HARMFUL[i][0], REFUSAL, None, 64) for i in idx])
    expected, lam = antibody_reference(model, batch, harmful, refusal, 0.2, 0.5, 0.5)
    trainer.training_step(model, dict(batch))
    assert trainer._extra["lambda_t"][0] == pytest.approx(lam, rel=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n] / 2, rtol=1e-4, atol=1e-6)


def ft_trainer(tokenizer, model, tmp_path, **overrides):
    spec = get_defense("antibody", "finetuning")
    base = dict(learning_rate=1e-2, max_steps=3, per_device_train_batch_size=4, warmup_steps=0, logging_steps=1,
                save_strategy="no", disable_tqdm=True, refusal_text=REFUSAL)
    base.update(overrides)
    args = make_config("antibody", "finetuning", tmp_path, **base)
    return spec.trainer_cls(model=model, args=args, train_dataset=encode(tokenizer, ROWS + HARMFUL),
                            data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                            **spec.trainer_cls.defense_inputs(args, tokenizer))


def seq_logp(model, tokenizer, prompt, answer):
    ex = PadCollator(tokenizer.pad_token_id)([encode_example(tokenizer, prompt, answer, None, 64)])
    logits = model(input_ids=ex["input_ids"]).logits[0, :-1]
    labels = ex["labels"][0, 1:]
    keep = labels != -100
    return -F.cross_entropy(logits[keep], labels[keep], reduction="sum"), int(keep.sum())


@pytest.mark.parametrize("normalize", [False, True])
def test_finetuning_weights_and_loss_are_the_formula(tokenizer, tmp_path, normalize):
    model = make_model(len(tokenizer), layers=2, seed=3)
    trainer = ft_trainer(tokenizer, model, tmp_path, tau=0.7, length_normalize=normalize)
    rows = [ROWS[0], HARMFUL[0], ROWS[2], HARMFUL[3]]
    batch = batch_of(tokenizer, rows)
    model.eval()  # no dropout in the tiny model; eval only keeps the comparison deterministic
    r, ce = [], []
    for p, a in rows:
        lp, n = seq_logp(model, tokenizer, p, a)
        lr, m = seq_logp(model, tokenizer, p, REFUSAL)
        r.append(float(lp / n - lr / m) if normalize else float(lp - lr))
        ce.append(-lp / n)
    weights = torch.softmax(torch.tensor(r) / 0.7, 0)
    expected = sum(w * c for w, c in zip(weights, ce))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(loss, list(model.parameters()))
    g_ref = torch.autograd.grad(expected, list(model.parameters()))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # weights carry no gradient
    assert trainer._extra["weight_max"][0] == pytest.approx(float(weights.max()), rel=1e-5)


def test_sample_weights_and_refusal_batches(tokenizer):
    w = sample_weights(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 0.0]), tau=1.0)
    torch.testing.assert_close(w, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0))
    assert torch.allclose(sample_weights(torch.tensor([0.0, 5.0]), torch.zeros(2), tau=1e6), torch.full((2,), 0.5))
    ids = refusal_answer_ids(tokenizer, REFUSAL)
    batch = batch_of(tokenizer, [ROWS[0], HARMFUL[1]])
    got = with_refusal(batch, ids, tokenizer.pad_token_id)
    ref = PadCollator(tokenizer.pad_token_id)(encode(tokenizer, [(ROWS[0][0], REFUSAL), (HARMFUL[1][0], REFUSAL)]))
    for k in ref:
        assert torch.equal(got[k], ref[k])


def test_short_antibody_runs_in_both_stages(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=2, seed=4)
    trainer = make_trainer(tokenizer, model, tmp_path / "a", "antibody", max_steps=3, refusal_text=REFUSAL)
    trainer.train()
    assert len([h for h in trainer.state.log_history if "lambda_t" in h]) == 3
    # a huge temperature spreads the weights evenly over the batch of 4; a tiny one puts all on one row
    for tau, weight_max in ((1e6, 0.25), (1e-3, 1.0)):
        trainer = ft_trainer(tokenizer, model, tmp_path / f"f{tau}", tau=tau)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "weight_max" in h]
        assert len(logs) == 3 and all(h["weight_max"] == pytest.approx(weight_max, abs=1e-4) for h in logs)


def test_antibody_registry_and_options(tmp_path):
    assert stages_of("antibody") == ["alignment", "finetuning"]
    for stage in ("alignment", "finetuning"):
        assert get_defense("antibody", stage).fidelity == "paper only"
    with pytest.raises(SinkguardError, match="several stages"):
        get_defense("antibody")
    with pytest.raises(SinkguardError, match="tau"):
        make_config("antibody", "finetuning", tmp_path, tau=0.0)
    with pytest.raises(SinkguardError, match="lambda_r"):
        make_config("antibody", "alignment", tmp_path, lambda_r=-1.0)
    with pytest.raises(SinkguardError, match="refusal_text"):
        make_config("antibody", "finetuning", tmp_path, refusal_text=" ")
