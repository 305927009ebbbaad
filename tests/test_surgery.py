"""Surgery trainer on a tiny model: the penalty shrinks, SFT shares the code path, configs validate."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

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
