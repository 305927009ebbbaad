"""Antidote on a tiny random Llama: the mask against a brute-force Wanda score computed from the
model's own hidden states, the per-row count, the full-fine-tuning (q/k/v) and LoRA-adapter
branches of `apply`, and the repair log."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from transformers import AutoModelForCausalLM

from sinkguard.data import PadCollator, defense_harmful_set, encode_example
from sinkguard.defenses import get_defense
from sinkguard.defenses.antidote import (
    AntidoteConfig,
    input_sq_norms,
    pruned_per_row,
    target_linears,
    wanda_mask,
)
from sinkguard.errors import SinkguardError

SAMPLES = 6


def _calibration(tokenizer):
    rows = defense_harmful_set(SAMPLES)
    return [encode_example(tokenizer, r["prompt"], r["response"], None, 64) for r in rows]


def brute_force_scaler(model, encoded, lora_a=None):
    """Per layer, sum over rows and tokens of x_j^2 / rows, x = input_layernorm(hidden state), one row at a
    time (the official batch size 1); with `lora_a` (layer -> {proj: A}) the lora_B inputs x A^T too."""
    layers = model.model.layers
    qkv = [torch.zeros(model.config.hidden_size) for _ in layers]
    b_in = [{p: torch.zeros(a.shape[0]) for p, a in lora_a[i].items()} if lora_a else {} for i in range(len(layers))]
    with torch.no_grad():
        for ex in encoded:
            hidden = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True).hidden_states
            for i, layer in enumerate(layers):
                x = layer.input_layernorm(hidden[i])[0]
                qkv[i] += (x ** 2).sum(0)
                for p, a in (lora_a[i].items() if lora_a else []):
                    b_in[i][p] += ((x @ a.T) ** 2).sum(0)
    n = len(encoded)
    return [q / n for q in qkv], [{p: v / n for p, v in d.items()} for d in b_in]


def brute_force_mask(weight, scaler, dense_ratio):
    """Per row: rank the entries by (score, column) ascending, zero the top `n - int(n * (1 - d))`."""
    rows, cols = weight.shape
    keep = int(cols * (1 - dense_ratio))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        scores = [(abs(float(weight[i, j].detach())) * float(scaler[j]) ** 0.5, j) for j in range(cols)]
        for _, j in sorted(scores)[keep:]:
            mask[i, j] = True
    return mask


def test_prune_count_follows_the_official_sort():
    assert pruned_per_row(4096, 0.1) == 410 and pruned_per_row(4096, 0.1, "floor") == 409
    assert pruned_per_row(8, 0.1) == 1 and pruned_per_row(8, 0.1, "floor") == 0  # a LoRA-B row (r = 8)
    assert pruned_per_row(32, 0.1) == 4 and pruned_per_row(10, 1.0) == 10


def test_mask_matches_brute_force_wanda_scores(tokenizer):
    model = make_model(len(tokenizer), seed=1).eval()
    encoded = _calibration(tokenizer)
    modules = target_linears(model, False, None)
    assert sorted({n.split(".")[-1] for n in modules}) == ["k_proj", "q_proj", "v_proj"]
    pad = PadCollator(tokenizer.pad_token_id)
    batches = [pad(encoded[i:i + 4]) for i in range(0, len(encoded), 4)]  # padded batches of 4
    norms, rows = input_sq_norms(model, modules, batches)
    assert rows == SAMPLES
    scaler, _ = brute_force_scaler(model, encoded)
    for name, module in modules.items():
        layer = int(name.split(".")[2])
        assert torch.allclose(norms[name], scaler[layer], rtol=1e-4), name
        mask = wanda_mask(module.weight, norms[name], 0.1)
        assert torch.equal(mask, brute_force_mask(module.weight, scaler[layer], 0.1)), name
        assert (mask.sum(1) == pruned_per_row(module.in_features, 0.1)).all()


def _save(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_full_finetuning_branch_prunes_qkv_only(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=2)
    src = _save(model, tokenizer, tmp_path / "ft" / "model")
    spec = get_defense("antidote", "post_finetuning")
    out = spec.apply(src, tmp_path / "rep", AntidoteConfig(samples=SAMPLES, max_length=64, system_prompt=None,
                                                           dense_ratio=0.25, device="cpu"))
    repaired = AutoModelForCausalLM.from_pretrained(out)
    scaler, _ = brute_force_scaler(model.eval(), _calibration(tokenizer))
    before, after = dict(model.named_parameters()), dict(repaired.named_parameters())
    log = json.loads((tmp_path / "rep" / "repair_log.json").read_text())
    assert log["branch"] == "full" and log["calibration_rows"] == SAMPLES
    for name, p in before.items():
        if any(f"self_attn.{m}.weight" in name for m in ("q_proj", "k_proj", "v_proj")):
            mask = brute_force_mask(p, scaler[int(name.split(".")[2])], 0.25)
            assert torch.equal(after[name], p.detach().masked_fill(mask, 0)), name
            assert log["pruned"][name.removesuffix(".weight")] == int(mask.sum())
            assert (mask.sum(1) == pruned_per_row(p.shape[1], 0.25)).all()
        else:
            assert torch.equal(after[name], p.detach()), name
    assert spec.apply(src, tmp_path / "rep", AntidoteConfig()) == out  # finished: reused


def test_lora_branch_prunes_the_adapter_then_merges(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = make_model(len(tokenizer), seed=3)
    base_dir = _save(base, tokenizer, tmp_path / "aligned")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "ft" / "adapter")
    lora_a = [{p: getattr(layer.self_attn, p).lora_A["default"].weight.detach() for p in ("q_proj", "v_proj")}
              for layer in peft.base_model.model.model.layers]
    merged = peft.merge_and_unload().eval()  # the fine-tuned model: its hidden states feed the adapter
    a_in, b_in = brute_force_scaler(merged, _calibration(tokenizer), lora_a)
    merged_dir = _save(merged, tokenizer, tmp_path / "ft" / "model")
    spec = get_defense("antidote", "post_finetuning")
    out = spec.apply(merged_dir, tmp_path / "rep", AntidoteConfig(samples=SAMPLES, max_length=64,
                                                                  system_prompt=None, device="cpu"))
    log = json.loads((tmp_path / "rep" / "repair_log.json").read_text())
    assert log["branch"] == "lora" and len(log["pruned"]) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    from peft import PeftModel

    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ft" / "adapter")
    pruned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "rep" / "adapter")
    for i, (lo, lp) in enumerate(zip(original.base_model.model.model.layers, pruned.base_model.model.model.layers)):
        for proj in ("q_proj", "v_proj"):
            for part, scaler in (("lora_A", a_in[i]), ("lora_B", b_in[i][proj])):
                w0 = getattr(getattr(lo.self_attn, proj), part)["default"].weight.detach()
                w1 = getattr(getattr(lp.self_attn, proj), part)["default"].weight.detach()
                mask = brute_force_mask(w0, scaler, 0.1)
                assert torch.allclose(w1, w0.masked_fill(mask, 0), atol=1e-6), (i, proj, part)
                assert (mask.sum(1) == pruned_per_row(w0.shape[1], 0.1)).all()
    repaired = AutoModelForCausalLM.from_pretrained(out)
    want = pruned.merge_and_unload()
    for (n, a), (_, b) in zip(repaired.named_parameters(), want.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(SinkguardError, match="dense_ratio"):
        AntidoteConfig(dense_ratio=0)
    with pytest.raises(SinkguardError, match="no LoRA adapter"):
        get_defense("antidote").apply(tmp_path, tmp_path / "out", AntidoteConfig(branch="lora"))
