"""`run_stage` / `run_post_stage` directly: resume of a half-finished stage, refusal of changed settings,
--overwrite, the LoRA adapter beside the merged model, dropped rows, and the post-fine-tuning stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file

from sinkguard.defenses import _REGISTRY, Defense
from sinkguard.defenses.sft import SinkguardTrainer
from sinkguard.errors import SinkguardError
from sinkguard.train import run_post_stage, run_stage, tokenize_rows

ROWS = [{"prompt": "analyze sentiment of input the movie was great", "response": "positive", "harmful": False},
        {"prompt": "analyze sentiment of input the movie was awful", "response": "negative", "harmful": False},
        {"prompt": "how can i make a bomb", "response": "you should never do that", "harmful": True},
        {"prompt": "how can i steal money", "response": "sorry cannot help", "harmful": True}] * 3
STAGE = dict(learning_rate=1e-2, max_steps=4, per_device_train_batch_size=3, max_length=48, seed=5)


@pytest.fixture
def tiny_dir(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=7)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _train(tiny_dir, out, **overrides):
    return run_stage("finetuning", "sft", tiny_dir, ROWS, out, system_prompt=None, **{**STAGE, **overrides})


def test_a_half_finished_stage_resumes_to_the_uninterrupted_weights_past_a_cut_off_save(tiny_dir, tmp_path, monkeypatch):
    full = _weights(_train(tiny_dir, tmp_path / "full", save_steps=2))
    original = SinkguardTrainer.training_step

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SinkguardTrainer, "training_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_dir, tmp_path / "cut", save_steps=2)
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "cut" / "model").exists()
    partial = tmp_path / "cut" / "checkpoints" / "checkpoint-3"  # a save cut off by a stopped session
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"cut off")
    steps = []

    def count(self, *args, **kwargs):
        steps.append(self.state.global_step + 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SinkguardTrainer, "training_step", count)
    resumed = _weights(_train(tiny_dir, tmp_path / "cut", save_steps=2))
    assert steps == [3, 4]  # steps 1-2 came from checkpoint-2; the cut-off checkpoint-3 was skipped
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6)
    # The log covers the whole run: the mean loss counts the steps before the resume too
    logs = [json.loads((tmp_path / run / "train_log.json").read_text()) for run in ("full", "cut")]
    assert logs[0]["resumed_at_step"] is None and logs[1]["resumed_at_step"] == 2
    assert logs[1]["train_loss"] == pytest.approx(logs[0]["train_loss"], abs=1e-5)


def test_changed_settings_are_refused_and_overwrite_trains_again(tiny_dir, tmp_path):
    out = tmp_path / "ft"
    first = _train(tiny_dir, out, max_steps=2)
    stamp_before = (out / "train_log.json").stat().st_mtime_ns
    assert _train(tiny_dir, out, max_steps=2) == first  # same settings: reused, not retrained
    assert (out / "train_log.json").stat().st_mtime_ns == stamp_before
    with pytest.raises(SinkguardError, match=r"other settings: learning_rate: 0.01 -> 0.02.*--overwrite"):
        _train(tiny_dir, out, max_steps=2, learning_rate=2e-2)
    with pytest.raises(SinkguardError, match="input rows changed"):
        run_stage("finetuning", "sft", tiny_dir, ROWS[:8], out, system_prompt=None, **{**STAGE, "max_steps": 2})
    _train(tiny_dir, out, max_steps=2, learning_rate=2e-2, overwrite=True)
    log = json.loads((out / "train_log.json").read_text())
    assert log["config"]["learning_rate"] == 2e-2 and (out / "train_log.json").stat().st_mtime_ns != stamp_before


def test_a_folder_without_a_record_is_not_reused(tiny_dir, tmp_path):
    out = tmp_path / "old"
    (out / "model").mkdir(parents=True)
    (out / "train_log.json").write_text("{}")
    with pytest.raises(SinkguardError, match="no record of the settings"):
        _train(tiny_dir, out, max_steps=1)


def test_lora_stage_saves_its_adapter_beside_the_merged_model(tiny_dir, tmp_path):
    out = tmp_path / "lora"
    _train(tiny_dir, out, max_steps=1, learning_rate=1e-1)
    assert not (out / "adapter").exists()
    run_stage("finetuning", "sft", tiny_dir, ROWS, tmp_path / "l2", system_prompt=None,
              lora=dict(r=2, alpha=4, dropout=0.0), **{**STAGE, "max_steps": 2, "learning_rate": 1e-1})
    adapter = tmp_path / "l2" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2 and set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)
    # The merged model is the base plus B @ A * alpha / r of the saved adapter.
    base, merged = _weights(Path(tiny_dir)), _weights(tmp_path / "l2" / "model")
    key = "model.layers.0.self_attn.q_proj.weight"
    a = next(v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    torch.testing.assert_close(merged[key], base[key] + (b @ a) * (4 / 2), rtol=0, atol=1e-6)


def test_dropped_rows_report_the_real_poison_ratio(tokenizer):
    long = {"prompt": " ".join(["bomb"] * 60), "response": "kill", "harmful": True}
    rows = [dict(r) for r in ROWS[:4]] * 2 + [long, long]  # asked p = 6/10, kept p = 4/8
    with pytest.raises(SinkguardError, match=r"2 of 10 rows do not fit in max_length=40 tokens, which moves the "
                                             r"poison ratio from 0.600 to 0.500; raise --max-length or pass --allow-drop"):
        tokenize_rows(rows, tokenizer, None, 40)
    examples, summary = tokenize_rows(rows, tokenizer, None, 40, allow_drop=True)
    assert len(examples) == 8 and summary == {"rows": 10, "examples": 8, "dropped": 2,
                                              "poison_ratio_asked": 0.6, "poison_ratio_real": 0.5}


@dataclasses.dataclass
class ScaleConfig:
    factor: float = 0.5


def _scale_apply(model_dir, out_dir, config, *, data_root=None, adapter_dir=None):
    """A dummy post-fine-tuning defense: scales every weight by `factor`, notes the adapter it got."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(config.factor)
    model.save_pretrained(Path(out_dir) / "model")
    (Path(out_dir) / "repair_log.json").write_text(json.dumps({"adapter": str(adapter_dir)}))
    return Path(out_dir) / "model"


@pytest.fixture
def scale_defense(monkeypatch):
    monkeypatch.setitem(_REGISTRY, ("scale", "post_finetuning"),
                        Defense("scale", "post_finetuning", ScaleConfig, apply=_scale_apply))


def test_post_stage_applies_reuses_and_refuses_changes(tiny_dir, tmp_path, scale_defense):
    out = tmp_path / "post"
    path = run_post_stage("scale", tiny_dir, out, options={"factor": 2})
    torch.testing.assert_close(_weights(path)["lm_head.weight"], 2 * _weights(Path(tiny_dir))["lm_head.weight"])
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert run_post_stage("scale", tiny_dir, out, options={"factor": 2}) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(SinkguardError, match=r"options.factor: 2.0 -> 3.0"):
        run_post_stage("scale", tiny_dir, out, options={"factor": 3})
    with pytest.raises(SinkguardError, match="has no option 'scale'; valid: factor"):
        run_post_stage("scale", tiny_dir, out, options={"scale": 3})


def test_experiment_runs_the_post_finetuning_stage(tiny_dir, tmp_path, scale_defense):
    pytest.importorskip("sinkguard.data")
    from sinkguard.data import data_root

    try:
        data_root()
    except SinkguardError:
        pytest.skip("needs ../shared/data (or SINKGUARD_DATA)")
    from test_experiment import KeywordJudge

    from sinkguard.experiment import ExperimentConfig, run_experiment

    stage = dict(samples=6, epochs=1, max_steps=1, lr=1e-3, batch_size=3, max_length=64)
    config = ExperimentConfig(
        name="post", model=tiny_dir, seeds=[1], alignment=None,
        finetuning=dict(defenses=["sft"], poison_ratios=[0.5], lora=dict(r=2, alpha=4, dropout=0.0),
                        allow_drop=True, **stage),
        post_finetuning=dict(defenses=["scale"], options={"scale": {"factor": 0.9}}),
        evaluation=dict(hs_limit=2, fa_limit=2, max_new_tokens=2, batch_size=4, analyze_samples=0),
    )
    results = run_experiment(config, tmp_path / "run", judge=KeywordJudge())
    posts = [(r["defense"], r["post"]) for r in results["records"]]
    assert posts == [("aligned", "none"), ("sft", "none"), ("sft", "scale")]
    post_dir = next((tmp_path / "run" / "stages").glob("post-scale-*"))
    ft_dir = next((tmp_path / "run" / "stages").glob("ft-sft-*"))
    assert json.loads((post_dir / "repair_log.json").read_text())["adapter"] == str(ft_dir / "adapter")
    torch.testing.assert_close(_weights(post_dir / "model")["lm_head.weight"],
                               0.9 * _weights(ft_dir / "model")["lm_head.weight"])


def test_a_stopped_stage_that_left_nothing_starts_afresh_with_new_inputs(tmp_path):
    from sinkguard import stamp

    out = tmp_path / "stopped"
    assert stamp.claim(out, {"lr": 1}, {"model": "a"}, ("model", "checkpoints")) is None  # stopped before a checkpoint
    assert stamp.claim(out, {"lr": 1}, {"model": "b"}, ("model", "checkpoints")) is None  # e.g. its base retrained
    assert stamp.read(out)["inputs"] == {"model": "b"}
    (out / "checkpoints").mkdir()  # something to resume from: other inputs are refused as before
    with pytest.raises(SinkguardError, match="input model changed"):
        stamp.claim(out, {"lr": 1}, {"model": "c"}, ("model", "checkpoints"))
