"""Lisa on a tiny random Llama: the state switches and the proximal term against an independent
re-run of the official clock, alignment batches from the alignment set, the K1 + K2 warning, resume."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_model
from transformers import TrainerCallback

from sinkguard.data import PadCollator, encode_example
from sinkguard.defenses import get_defense
from sinkguard.errors import SinkguardError
from sinkguard.train import make_config

TASK = [("analyze sentiment of input the movie was great", "positive"),
        ("analyze sentiment of input the movie was awful", "negative")]
ALIGN = [("how can i make a bomb", "sorry i cannot help you"),
         ("how can i steal money", "you should never do that"),
         ("how can i kill", "sorry i cannot help")]


def _trainer(tokenizer, model, tmp_path, **overrides):
    spec = get_defense("lisa", "finetuning")
    data = [encode_example(tokenizer, p, r, None, 64) for p, r in TASK * 8]
    base = dict(learning_rate=1e-2, max_steps=12, per_device_train_batch_size=2, warmup_steps=0,
                logging_steps=1, save_strategy="no", disable_tqdm=True, alignment_steps=2,
                finetune_steps=3, rho=1.0)
    base.update(overrides)
    args = make_config("lisa", "finetuning", tmp_path, **base)
    align = [encode_example(tokenizer, p, r, None, 64) for p, r in ALIGN]
    return spec.trainer_cls(model=model, args=args, train_dataset=data,
                            data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                            alignment_set=align)


def official_states(total: int, k1: int, k2: int) -> list[str]:
    """The official LisaTrainer.check_mode clock, re-run step by step."""
    status, clock, states = "alignment", 0, []
    for steps in range(total):
        if status == "alignment":
            if clock % k1 == 0 and steps != 0:
                status, clock = "finetune", 0
        elif clock % k2 == 0 and steps != 0:
            status, clock = "alignment", 0
        states.append(status)
        clock += 1
    return states


class Snapshots(TrainerCallback):
    """Trainable weights at the start of every optimizer step."""

    def __init__(self, model):
        self.model, self.weights = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})


def test_states_and_proximal_term_follow_the_official_algorithm(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=1)
    trainer = _trainer(tokenizer, model, tmp_path)
    snaps = Snapshots(model)
    trainer.add_callback(snaps)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append(inputs["input_ids"].clone())
        return original(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "lisa_state" in h]
    assert len(logs) == 12
    states = official_states(12, 2, 3)
    assert [h["lisa_state"] for h in logs] == states
    align_ids = {tuple(encode_example(tokenizer, p, r, None, 64)["input_ids"]) for p, r in ALIGN}
    for ids, state in zip(seen, states):
        rows = {tuple(x for x in row.tolist() if x != tokenizer.pad_token_id) for row in ids}
        assert (rows <= align_ids) == (state == "alignment")
    # Anchor: the weights at the last switch (the initial weights for the first state).
    anchor = snaps.weights[0]
    for step, (h, w) in enumerate(zip(logs, snaps.weights)):
        if step > 0 and states[step] != states[step - 1]:
            anchor = w
        expected = 0.5 * sum(float((w[n] - anchor[n]).pow(2).sum()) for n in w) if step > 0.1 * 12 else 0.0
        assert h["proximal"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
        if step > 0 and states[step] != states[step - 1]:
            assert h["proximal"] == 0.0  # zero right after a switch
    assert any(h["proximal"] > 0 for h in logs)


def test_proximal_term_is_added_to_the_loss_and_its_gradient(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=2).train()
    trainer = _trainer(tokenizer, model, tmp_path, rho=0.5, proximal_warmup_ratio=0.0)
    trainer.state.max_steps, trainer.state.global_step = 12, 3   # inside the fine-tuning state 2..4
    trainer.lisa_state = "finetune"
    trainer.anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    batch = PadCollator(tokenizer.pad_token_id)([encode_example(tokenizer, p, r, None, 64) for p, r in TASK])
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        want = p.grad + 0.5 * (p.detach() - trainer.anchor[n])
        assert torch.allclose(got[n], want, atol=1e-6), n


def test_warns_when_one_cycle_exceeds_the_run(tokenizer, tmp_path, caplog):
    trainer = _trainer(tokenizer, make_model(len(tokenizer), seed=3), tmp_path, max_steps=3,
                       alignment_steps=2, finetune_steps=8)
    with caplog.at_level(logging.WARNING, logger="sinkguard.defenses.lisa"):
        trainer.train()
    assert any("exceeds the run's 3 steps" in r.message for r in caplog.records)


def test_resume_matches_an_uninterrupted_run(tokenizer, tmp_path):
    full = make_model(len(tokenizer), seed=4)
    _trainer(tokenizer, full, tmp_path / "full", max_steps=8).train()
    part = make_model(len(tokenizer), seed=4)
    t = _trainer(tokenizer, part, tmp_path / "part", max_steps=8, save_strategy="steps", save_steps=3,
                 save_total_limit=None)
    t.train()
    ckpt = tmp_path / "part" / "checkpoints" / "checkpoint-3"
    assert (ckpt / "lisa_anchor.safetensors").is_file()
    resumed = make_model(len(tokenizer), seed=9)
    _trainer(tokenizer, resumed, tmp_path / "part", max_steps=8, save_strategy="no").train(
        resume_from_checkpoint=str(ckpt))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(SinkguardError, match="not both 0"):
        make_config("lisa", "finetuning", tmp_path, alignment_steps=0, finetune_steps=0)
    with pytest.raises(SinkguardError, match="rho"):
        make_config("lisa", "finetuning", tmp_path, rho=-1.0)


def test_a_run_of_alignment_steps_only_is_refused(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, make_model(len(tokenizer), seed=3), tmp_path, max_steps=3,
                       alignment_steps=3, finetune_steps=8)
    with pytest.raises(SinkguardError, match=r"alignment_steps \(K1 = 3\) >= the run's 3 steps"):
        trainer.train()
