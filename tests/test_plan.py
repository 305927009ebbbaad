"""Dry-run planning facts: parameter counts match real models, memory estimate adds up."""

from __future__ import annotations

import pytest
from conftest import make_model

from sinkguard.errors import SinkguardError
from sinkguard.plan import ModelFacts, memory_per_device, model_facts


def test_parameter_count_matches_a_built_model():
    model = make_model(53, layers=3, heads=4, kv_heads=2)
    cfg = model.config
    facts = ModelFacts(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                       cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size,
                       tie_word_embeddings=cfg.tie_word_embeddings)
    assert facts.params() == sum(p.numel() for p in model.parameters())


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = make_model(53, layers=2, heads=4, kv_heads=2)
    cfg = model.config
    facts = ModelFacts(cfg.hidden_size, 2, 4, 2, cfg.intermediate_size, 53)
    targets = ("q_proj", "v_proj", "down_proj")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert facts.lora_params(4, targets) == trainable


def test_paper_models_have_their_published_sizes():
    assert model_facts("meta-llama/Meta-Llama-3-8B-Instruct").params() == 8_030_261_248
    assert model_facts("meta-llama/Llama-2-7b-hf").params() == 6_738_415_616
    with pytest.raises(SinkguardError, match="known"):
        model_facts("nope/nope")


def test_sharding_divides_states_not_activations():
    facts = model_facts("meta-llama/Meta-Llama-3-8B-Instruct")
    one = memory_per_device(facts, batch=10, seq=512)
    eight = memory_per_device(facts, batch=10, seq=512, shards=8)
    assert eight["weights"] == pytest.approx(one["weights"] / 8, rel=1e-2)
    assert eight["activations"] == one["activations"]
    assert one["weights"] == pytest.approx(8_030_261_248 * 2 / 2**30, rel=1e-3)
    lora = memory_per_device(facts, batch=10, seq=512, lora_r=8, lora_targets=("q_proj", "v_proj"))
    assert lora["optimizer"] < 0.01 * one["optimizer"]
