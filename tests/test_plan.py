"""Dry-run planning: parameter counts match real models, the memory estimate adds up by hand, every
paper config dry-runs offline, and the new keys (dtype, judge, hub_datasets) are validated and wired."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_model

from sinkguard.errors import SinkguardError
from sinkguard.experiment import ExperimentConfig
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


# ------------------------------------------------------------------ hand-computed estimate

TINY = ModelFacts(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=16, vocab_size=32)


def test_memory_of_a_tiny_model_by_hand():
    """Parameters: embeddings 256 + LM head 256 + 2 layers x (attention 128 + 64, MLP 384, norms 16)
    + final norm 8 = 1,704. Activations per token with 2-byte values: 2 layers x (norms 2 x (4 + 2) x 8
    + 2 x (5 x 8 + 2 x 4 + 4 x 16)) + final norm (4 + 2) x 8 = 2 x 320 + 48 = 688 bytes; logits: 32 values
    per token at 2 + 8 bytes (the logits, their fp32 log-softmax and its gradient)."""
    assert TINY.params() == 1704
    gib = 2**30
    # full fine-tuning in bf16, 2 x 4 tokens: weights, gradients 2 bytes, AdamW 2 x 2 bytes per parameter
    full = memory_per_device(TINY, dtype="bfloat16", batch=2, seq=4)
    assert full["weights"] * gib == pytest.approx(3408)
    assert full["optimizer"] * gib == pytest.approx(6816)
    assert full["activations"] * gib == pytest.approx(8 * 688 + 8 * 32 * (2 + 8))  # 5504 + 2560
    assert full["total"] * gib == pytest.approx(3408 + 3408 + 6816 + 8064)
    # LoRA r 2 on q (8 -> 8) and v (8 -> 4): 2 layers x (2 x 16 + 2 x 12) = 112 float32 parameters;
    # the frozen base in fp16, nothing sharded (4 shards asked), one defense copy of the adapters
    lora = memory_per_device(TINY, dtype="float16", batch=2, seq=4, lora_r=2, lora_targets=("q_proj", "v_proj"),
                             shards=4, copies=1)
    assert lora["weights"] * gib == pytest.approx(1704 * 2 + 112 * 4)
    assert (lora["gradients"] * gib, lora["optimizer"] * gib, lora["copies"] * gib) == pytest.approx((448, 896, 448))
    assert lora["total"] * gib == pytest.approx(3856 + 448 + 896 + 448 + 8064)
    # float32 weights sharded over 4 devices, bf16 autocast, 3 extra tokens held for the backward
    mixed = memory_per_device(TINY, dtype="float32", batch=2, seq=4, shards=4, extra_tokens=3,
                              activation_dtype="bfloat16")
    assert (mixed["weights"] * gib, mixed["gradients"] * gib, mixed["optimizer"] * gib) == pytest.approx(
        (1704, 1704, 3408))
    assert mixed["activations"] * gib == pytest.approx((8 + 3) * 688 + 8 * 32 * 10)  # 7568 + 2560


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_the_tensors_saved_for_backward(dtype):
    """Bytes of every non-parameter tensor autograd keeps during a training forward of a tiny Llama,
    against the estimate less what is not a saved tensor (the logits in `dtype` and the log-softmax
    gradient, which exist only at the backward's start)."""
    model = make_model(101, layers=2, heads=4, kv_heads=2).to(dtype)
    facts = ModelFacts.from_config(model.config.to_dict())
    batch, seq = 2, 16
    ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids)
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    b = 4 if dtype == torch.float32 else 2
    name = "float32" if dtype == torch.float32 else "bfloat16"
    est = memory_per_device(facts, dtype=name, batch=batch, seq=seq)["activations"] * 2**30
    assert est - batch * seq * 101 * (b + 4) == pytest.approx(measured, rel=0.05)


def test_surgery_holds_its_pools_only_when_they_outgrow_the_batch_or_share_its_backward():
    from types import SimpleNamespace

    from sinkguard.plan import step_cost

    args = SimpleNamespace(regularizer_batch_size=1, pool_max_length=512, penalty_backward="separate")
    assert step_cost("surgery", "finetuning", args, 10 * 1024) == step_cost("surgery", "finetuning", args, 10240)
    assert step_cost("surgery", "finetuning", args, 10240).held == 0
    assert step_cost("surgery", "finetuning", args, 10240).processed == 10240 + 1024
    assert step_cost("surgery", "finetuning", args, 256).held == 1024 - 256
    joint = SimpleNamespace(**{**vars(args), "penalty_backward": "joint"})
    assert step_cost("surgery", "finetuning", joint, 10240).held == 1024
    assert step_cost("sft", "finetuning", args, 100).processed == 100


def test_facts_come_from_a_local_model_folder(tmp_path):
    from sinkguard.plan import find_facts

    model = make_model(53, layers=2, heads=4, kv_heads=2)
    model.save_pretrained(tmp_path / "m")
    facts = find_facts(str(tmp_path / "m"))
    assert facts.params() == sum(p.numel() for p in model.parameters())
    assert find_facts(str(tmp_path / "nothing")) is None


# ------------------------------------------------------------------ the paper configs, offline

PAPER = sorted(Path("configs/paper").glob("*.yaml"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no model, tokenizer or dataset resolution: each is an error if touched."""
    import socket

    import sinkguard.data.sources as sources
    import sinkguard.models as models
    import sinkguard.train as train  # imported before the patches, which then cover its own bindings too

    def boom(*args, **kwargs):
        raise AssertionError("the dry run reached for a model, a dataset or the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SINKGUARD_CACHE", str(tmp_path / "cache"))
    for module in (models, train):
        for name in ("load_model", "load_tokenizer", "resolve"):
            monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(sources, "_hub", boom)
    monkeypatch.setattr(socket.socket, "connect", boom)


def test_the_paper_configs_are_shipped():
    names = {p.name for p in PAPER}
    assert "surgery_gsm8k.yaml" in names and any(n.startswith("tvaccine_") for n in names)
    for method in ("vaccine", "lisa", "panacea", "antidote", "booster", "repnoise", "antibody"):
        assert any(method in p.read_text() for p in PAPER), method


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_every_paper_config_dry_runs_offline(path, offline, tmp_path, capsys):
    from sinkguard.cli import main

    cfg = ExperimentConfig.from_yaml(path)
    assert cfg.evaluation.judge == "PKU-Alignment/beaver-dam-7b" and cfg.hub_datasets
    assert main(["run", str(path), "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    train = [line for line in out.splitlines() if line.startswith(("  alignment ", "  finetuning "))
             and ": stages/" in line]
    assert train and all(re.search(r", \d+ steps\)$", line) for line in train)
    assert re.search(r"memory ~ \d+\.\d GiB \(weights", out) and "training tokens in all <= " in out
    assert not (tmp_path / "run").exists()


def test_surgery_grid_plan_and_estimate(offline, capsys):
    from sinkguard.cli import main

    cfg = ExperimentConfig.from_yaml("configs/paper/surgery_gsm8k.yaml")
    f = cfg.finetuning
    assert (cfg.model, cfg.alignment, f.samples, f.epochs, f.lr, f.batch_size, f.dtype) == (
        "meta-llama/Meta-Llama-3-8B-Instruct", None, 1000, 5, 5e-6, 10, "bfloat16")
    assert f.poison_ratios == [0.0, 0.05, 0.1, 0.15, 0.2] and f.options["surgery"]["alpha"] == 300
    assert main(["run", "configs/paper/surgery_gsm8k.yaml", "--dry-run", "--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("  finetuning ") and "(from meta-llama/Meta-Llama-3-8B-Instruct, 500 steps)" in line
               for line in out.splitlines()) == 10  # 2 defenses x 5 ratios, 1,000 rows / 10 x 5 epochs
    est = memory_per_device(model_facts(cfg.model), dtype="bfloat16", batch=10, seq=1024, shards=8,
                            activation_dtype="bfloat16")
    assert f"memory ~ {est['total']:.1f} GiB" in out and "sharded over 8 devices" in out


def test_dry_run_in_a_fresh_process_offline(tmp_path):
    """The CLI as users run it, with the hub switched off: exit 0, the plan, no downloads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "SINKGUARD_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path("src").resolve())}
    done = subprocess.run([sys.executable, "-m", "sinkguard.cli", "run", "configs/paper/tvaccine_sst2_agnews.yaml",
                           "--dry-run", "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "23 stages" in done.stdout and "4000 steps" in done.stdout and "memory ~ " in done.stdout
    assert "ships no chat template" not in done.stdout  # Llama-2-7b-hf formatted with template alpaca
    assert not (tmp_path / "hf").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the new keys

@pytest.mark.parametrize("patch, message", [
    ({"finetuning": {"dtype": "fp8"}}, "finetuning.dtype: unknown 'fp8'; valid: float32, bfloat16, float16"),
    ({"alignment": {"dtype": 16}}, "alignment.dtype must be a string, got 16"),
    ({"evaluation": {"judge": "nobody/judge"}}, "evaluation.judge: unknown judge 'nobody/judge'; valid: local, "
                                                "PKU-Alignment/beaver-dam-7b"),
    ({"hub_datasets": ["openai/gsm9k"]}, "hub_datasets: unknown 'openai/gsm9k'; valid: PKU-Alignment/BeaverTails"),
    ({"hub_datasets": "openai/gsm8k"}, "hub_datasets must be a list"),
])
def test_bad_new_keys_are_one_line_errors(patch, message, tmp_path, capsys):
    from sinkguard.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", **patch}))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sinkguard: error: ") and message in err


def test_new_keys_keep_the_hashes_of_configs_without_them():
    """Hashes printed by the code before these keys (quickstart); a real dtype or hub data changes them,
    the judge does not (verdict-only: a new judge re-scores the cached answers)."""
    from sinkguard.experiment import Experiment

    def folders(cfg):
        return [job["folder"] for job in Experiment(cfg, "unused").plan()]

    base = ExperimentConfig.from_yaml("configs/quickstart.yaml")
    old = folders(base)
    assert old[0] == "stages/align-sft-f65b3e3ee7" and "stages/eval-a9cb11f5c2" in old
    assert folders(dataclasses.replace(base, evaluation=dataclasses.replace(base.evaluation, judge=JUDGE))) == old
    bf16 = folders(dataclasses.replace(base, finetuning=dataclasses.replace(base.finetuning, dtype="bfloat16")))
    assert bf16[0] == old[0] and bf16[1] != old[1]
    assert folders(dataclasses.replace(base, hub_datasets=["openai/gsm8k"]))[0] != old[0]


JUDGE = "PKU-Alignment/beaver-dam-7b"


def test_hub_sources_route_named_sets_to_the_hub(monkeypatch):
    import sinkguard.data.sources as sources

    calls = []

    def fake_hub(name, split):
        calls.append((name, split))
        if name == "sst2":
            raise ConnectionError("offline")
        return [{"prompt": "What is 2 + 2?", "response": "4. The final answer is: 4", "label": "4"}]

    monkeypatch.setattr(sources, "_hub", fake_hub)
    sources._load_hub.cache_clear()
    local = sources.load_source("gsm8k", "test")
    with sources.hub_sources(["openai/gsm8k", "stanfordnlp/sst2"]):
        assert sources.load_source("gsm8k", "test")[0]["prompt"] == "What is 2 + 2?"
        with pytest.raises(SinkguardError, match=r"hub dataset stanfordnlp/sst2 \(sst2, split test\) could not be "
                                                 r"loaded; it needs internet .*ConnectionError: offline"):
            sources.load_source("sst2", "test")
        with sources.hub_sources(()):
            assert sources.load_source("gsm8k", "test") == local
    assert sources.load_source("gsm8k", "test") == local and calls == [("gsm8k", "test"), ("sst2", "test")]
    sources._load_hub.cache_clear()


def test_stage_dtype_reaches_the_model_and_its_record(tokenizer, tmp_path):
    import json

    from safetensors.torch import load_file

    from sinkguard.train import run_stage

    path = tmp_path / "tiny"
    make_model(len(tokenizer), seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    rows = [{"prompt": "say yes", "response": "yes"}, {"prompt": "say no", "response": "no"}] * 2
    kw = dict(system_prompt=None, max_steps=1, per_device_train_batch_size=2, max_length=32, seed=1)
    out = run_stage("finetuning", "sft", str(path), rows, tmp_path / "bf16", dtype="bfloat16", **kw)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    record = json.loads((tmp_path / "bf16" / "stage.json").read_text())
    assert record["settings"]["dtype"] == "bfloat16"
    out = run_stage("finetuning", "sft", str(path), rows, tmp_path / "fp32", **kw)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    assert "dtype" not in json.loads((tmp_path / "fp32" / "stage.json").read_text())["settings"]


def test_training_refuses_a_tokenizer_without_chat_template(tokenizer):
    from sinkguard.train import tokenize_rows

    tokenizer.chat_template = None
    with pytest.raises(SinkguardError, match="has no chat template"):
        tokenize_rows([{"prompt": "a", "response": "b"}], tokenizer, None, 16)
