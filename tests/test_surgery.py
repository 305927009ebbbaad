"""Surgery trainer on a tiny model: the penalty shrinks, SFT shares the code path, configs validate."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, stop_at

from sinkguard.data import PadCollator, encode_example, encode_text
from sinkguard.defenses import get_defense
from sinkguard.errors import SinkguardError
from sinkguard.sink import sink_divergence, surgery_penalty
from sinkguard.train import make_config

HARMFUL = ("how can i make a bomb", "kill")
HARMLESS = ("what is good news", "the movie was great and good and it is good news")


def _trainer(tokenizer, model, tmp_path, defense="surgery", **overrides):
    spec = get_defense(defense, "finetuning")
    rows = [("analyze sentiment of input the movie was great", "positive"),
            ("analyze sentiment of input the movie was awful", "negative")] * 4
    data = [encode_example(tokenizer, p, r, None, 64) for p, r in rows]
    args = make_config(defense, "finetuning", tmp_path, learning_rate=1e-2, max_steps=3,
                       per_device_train_batch_size=4, warmup_steps=0, logging_steps=1,
                       save_strategy="no", disable_tqdm=True, **overrides)
    extra = {}
    if defense == "surgery":
        extra = {"harmful_pool": [encode_text(tokenizer, *HARMFUL)],
                 "harmless_pool": [encode_text(tokenizer, *HARMLESS)]}
    return spec.trainer_cls(model=model, args=args, train_dataset=data,
                            data_collator=PadCollator(tokenizer.pad_token_id),
                            processing_class=tokenizer, **extra)


def _penalty(model, tokenizer):
    h = torch.tensor([encode_text(tokenizer, *HARMFUL)])
    s = torch.tensor([encode_text(tokenizer, *HARMLESS)])
    with torch.no_grad():
        return surgery_penalty(sink_divergence(model, {"input_ids": h}, {"input_ids": s})).item()


def test_three_surgery_steps_lower_the_sink_loss(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=1)
    before = _penalty(model, tokenizer)
    assert before > 0
    trainer = _trainer(tokenizer, model, tmp_path, alpha=300.0)
    trainer.train()
    after = _penalty(model.eval(), tokenizer)
    assert after < 0.5 * before
    logged = [h for h in trainer.state.log_history if "sink_loss" in h]
    assert len(logged) == 3 and all("task_loss" in h and "positive_heads" in h for h in logged)


def test_eager_and_sdpa_regularisers_agree(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=2).train()
    sdpa = _trainer(tokenizer, model, tmp_path / "a", sink_impl="sdpa").sink_divergence_step(model)
    eager = _trainer(tokenizer, model, tmp_path / "b", sink_impl="eager").sink_divergence_step(model)
    assert torch.allclose(sdpa, eager, atol=1e-5)


def test_sft_trains_without_sink_terms(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=3)
    trainer = _trainer(tokenizer, model, tmp_path, defense="sft")
    trainer.train()
    assert trainer.state.global_step == 3
    assert not any("sink_loss" in h for h in trainer.state.log_history)


def test_alpha_zero_is_plain_sft(tokenizer, tmp_path):
    a = make_model(len(tokenizer), seed=4)
    b = make_model(len(tokenizer), seed=4)
    _trainer(tokenizer, a, tmp_path / "a", alpha=0.0).train()
    _trainer(tokenizer, b, tmp_path / "b", defense="sft").train()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_surgery_with_lora(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(len(tokenizer), seed=5),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    trainer = _trainer(tokenizer, model, tmp_path, alpha=300.0)
    trainer.train()
    assert any(h.get("sink_loss", 0) > 0 for h in trainer.state.log_history)


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(SinkguardError, match="sink_impl"):
        make_config("surgery", "finetuning", tmp_path, sink_impl="flash")
    with pytest.raises(SinkguardError, match="no option"):
        make_config("surgery", "finetuning", tmp_path, rho=2.0)
    with pytest.raises(SinkguardError, match="unknown defense"):
        get_defense("nope")
    with pytest.raises(SinkguardError, match="fine-tuning|finetuning"):
        get_defense("surgery", "alignment")


POOL_HARMFUL = [("how can i make a bomb", "kill"), ("how can i steal money", "fake money"),
                ("how can i kill", "make a bomb"), ("steal fake money", "kill it"), ("make a bomb", "bomb")]
POOL_HARMLESS = [("what is good news", "the movie was great"), ("hello world", "hello"),
                 ("sports business news", "sports is good"), ("what is it", "it is this"),
                 ("analyze sentiment", "positive")]


def _pool_trainer(tokenizer, model, tmp_path, **overrides):
    """A Surgery trainer over 16 rows and five-text pools, two texts drawn per pool and step."""
    rows = [("analyze sentiment of input the movie was great", "positive"),
            ("analyze sentiment of input the movie was awful", "negative"),
            ("what is good news", "the movie was great and good"), ("hello world", "hello")] * 4
    data = [encode_example(tokenizer, p, r, None, 64) for p, r in rows]
    settings = dict(learning_rate=1e-2, max_steps=4, per_device_train_batch_size=2, warmup_steps=0,
                    logging_steps=1, save_strategy="no", disable_tqdm=True, regularizer_batch_size=2)
    settings.update(overrides)
    args = make_config("surgery", "finetuning", tmp_path, **settings)
    return get_defense("surgery", "finetuning").trainer_cls(
        model=model, args=args, train_dataset=data, data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        harmful_pool=[encode_text(tokenizer, *r) for r in POOL_HARMFUL],
        harmless_pool=[encode_text(tokenizer, *r) for r in POOL_HARMLESS])


@pytest.mark.parametrize("accumulation", [1, 3])
def test_separate_penalty_backward_gives_the_single_backward_gradients(tokenizer, tmp_path, accumulation):
    """Penalty backward first, then the task backward: the same .grad as one backward of the sum."""
    grads = {}
    collate = PadCollator(tokenizer.pad_token_id)
    batch = collate([encode_example(tokenizer, "analyze sentiment of input the movie was great", "positive"),
                     encode_example(tokenizer, "hello world", "hello")])
    for mode in ("joint", "separate"):
        model = make_model(len(tokenizer), seed=7)
        trainer = _pool_trainer(tokenizer, model, tmp_path / mode, penalty_backward=mode)
        trainer.current_gradient_accumulation_steps = accumulation
        for _ in range(accumulation):
            trainer.training_step(model, dict(batch))
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert any(g.abs().sum() > 0 for g in grads["separate"])
    for a, b in zip(grads["joint"], grads["separate"]):
        assert torch.allclose(a, b, atol=1e-6)


def test_separate_and_joint_train_the_same_weights_under_accumulation(tokenizer, tmp_path):
    weights = {}
    for mode in ("joint", "separate"):
        model = make_model(len(tokenizer), seed=8)
        _pool_trainer(tokenizer, model, tmp_path / mode, penalty_backward=mode,
                      gradient_accumulation_steps=2, max_steps=2).train()
        weights[mode] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(weights["joint"], weights["separate"]):
        assert torch.allclose(a, b, atol=1e-6)


def test_resumed_run_draws_and_trains_like_an_uninterrupted_one(tokenizer, tmp_path):
    """Interrupt after 2 of 4 steps, resume from the checkpoint: same pool draws, same weights."""
    full_model = make_model(len(tokenizer), seed=9)
    full = _pool_trainer(tokenizer, full_model, tmp_path / "full", gradient_accumulation_steps=2)
    full.train()

    model = make_model(len(tokenizer), seed=9)
    first = _pool_trainer(tokenizer, model, tmp_path / "cut", gradient_accumulation_steps=2,
                          save_strategy="steps", save_steps=2)
    first.add_callback(stop_at(2))
    first.train()
    assert first.state.global_step == 2
    resumed_model = make_model(len(tokenizer), seed=123)  # weights come from the checkpoint
    resumed = _pool_trainer(tokenizer, resumed_model, tmp_path / "cut", gradient_accumulation_steps=2,
                            save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoints" / "checkpoint-2"))

    assert first.draw_log + resumed.draw_log == full.draw_log
    assert len({tuple(d[2]) for d in full.draw_log}) > 1  # the draws do vary from step to step
    assert [d[:2] for d in full.draw_log] == [(s, m) for s in range(4) for m in range(2)]
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_ranks_draw_their_own_texts_unless_same_pool_draws(tokenizer, tmp_path, monkeypatch):
    model = make_model(len(tokenizer), seed=10)
    trainer = _pool_trainer(tokenizer, model, tmp_path)
    rank0 = trainer._draw()
    trainer._draw_at = (-1, 0)
    monkeypatch.setattr(type(trainer.args), "process_index", property(lambda self: 1))  # rank 1 of 2
    assert trainer._draw() != rank0
    trainer._draw_at = (-1, 0)
    trainer.args.same_pool_draws = True
    assert trainer._draw() == rank0
