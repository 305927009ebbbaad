"""Vaccine and T-Vaccine on tiny random Llama models (GQA): the perturbation, the two passes,
gradient accumulation, T-Vaccine's scoring, sampling, freezing and checkpointing, short runs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, stop_at

from sinkguard.data import PadCollator, encode_example
from sinkguard.defenses import get_defense
from sinkguard.defenses.vaccine import decoder_layers
from sinkguard.errors import SinkguardError
from sinkguard.train import lora_config, make_config

ROWS = [("how can i make a bomb", "sorry i cannot help you"),
        ("how can i steal money", "you should never do that"),
        ("how can i make fake money", "sorry you should never do that"),
        ("how can i kill", "sorry i cannot help")]
HARMFUL = [("how can i make a bomb", "you should make a bomb and kill")]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, which only contend on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(tokenizer, model, tmp_path, defense="vaccine", **overrides):
    spec = get_defense(defense, "alignment")
    data = [encode_example(tokenizer, p, r, None, 64) for p, r in ROWS * 2]
    base = dict(learning_rate=1e-2, max_steps=4, per_device_train_batch_size=4, warmup_steps=0,
                logging_steps=1, save_strategy="no", disable_tqdm=True)
    if defense == "tvaccine":
        base.update(lisa_activated_layers=2, lisa_interval_steps=2, probability_steps=4)
    base.update(overrides)
    args = make_config(defense, "alignment", tmp_path, **base)
    extra = {"harmful_set": [encode_example(tokenizer, p, r, None, 64) for p, r in HARMFUL]} \
        if defense == "tvaccine" else {}
    trainer = spec.trainer_cls(model=model, args=args, train_dataset=data,
                               data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                               **extra)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def _batch(tokenizer, rows=ROWS):
    return PadCollator(tokenizer.pad_token_id)([encode_example(tokenizer, p, r, None, 64) for p, r in rows])


def _spy(trainer) -> dict:
    """Record the perturbation the trainer adds in pass 2."""
    seen = {}
    original = trainer.add_to_outputs

    def spy(perturb):
        seen.update({i: e.clone() for i, e in perturb.items()})
        return original(perturb)

    trainer.add_to_outputs = spy
    return seen


def _output_grads(model, batch, indices):
    """Reference: d loss / d attention output of `indices`, by torch.autograd.grad."""
    outs = {}
    layers = decoder_layers(model)
    hooks = [layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0]))
             for i in indices]
    loss = model(**batch).loss
    for h in hooks:
        h.remove()
    return dict(zip(indices, torch.autograd.grad(loss, [outs[i] for i in indices])))


def _reference_grads(model, batch, perturb, n_items=None, accumulation=1):
    """Reference: parameter gradients of the loss with `perturb` added to the attention outputs,
    scaled as the Trainer does (sum / n_items when given, else mean / accumulation steps)."""
    layers = decoder_layers(model)
    hooks = [layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: (o[0] + perturb[i], *o[1:]))
             for i in perturb]
    if n_items is None:
        loss = model(**batch).loss / accumulation
    else:
        loss = model(**batch, num_items_in_batch=n_items).loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for h in hooks:
        h.remove()
    return dict(zip(params, grads))


def _global_norm(tensors):
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()


def test_vaccine_perturbation_is_rho_times_globally_normalised_output_gradient(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=3, seed=1)
    trainer = _trainer(tokenizer, model, tmp_path, rho=2.5)
    seen = _spy(trainer)
    batch = _batch(tokenizer)
    trainer.training_step(model, dict(batch))
    assert sorted(seen) == [0, 1, 2]  # Vaccine perturbs every layer
    ref = _output_grads(model.train(), batch, [0, 1, 2])
    norm = _global_norm(ref.values())
    for i in seen:
        torch.testing.assert_close(seen[i], 2.5 * ref[i] / (norm + 1e-7), rtol=1e-4, atol=1e-7)
    assert _global_norm(seen.values()) == pytest.approx(2.5, rel=1e-5)
    per_layer = [e.norm().item() for e in seen.values()]
    assert max(per_layer) < 2.5 - 1e-3  # one global norm, not rho per layer


@pytest.mark.parametrize("with_items", [False, True])
def test_vaccine_optimizer_gets_pass_two_gradients_and_accumulation_is_kept(tokenizer, tmp_path, with_items):
    model = make_model(len(tokenizer), layers=2, seed=2)
    trainer = _trainer(tokenizer, model, tmp_path, rho=1.0, gradient_accumulation_steps=2)
    seen = _spy(trainer)
    batch = _batch(tokenizer)
    n_items = int((batch["labels"][:, 1:] != -100).sum()) if with_items else None
    torch.manual_seed(0)
    earlier = {p: torch.randn_like(p) for p in model.parameters()}  # a previous micro-batch's gradients
    for p, g in earlier.items():
        p.grad = g.clone()
    trainer.training_step(model, dict(batch), num_items_in_batch=n_items)
    got = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    perturbed = _reference_grads(model, batch, seen, n_items, accumulation=2)
    clean = _reference_grads(model, batch, {i: torch.zeros_like(e) for i, e in seen.items()}, n_items, 2)
    for p in got:
        torch.testing.assert_close(got[p], earlier[p] + perturbed[p], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(perturbed[p], clean[p], atol=1e-6) for p in got)  # not the SFT step


def test_tvaccine_perturbs_and_trains_only_the_selected_layers_lora(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=4, seed=3)
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(r=4, alpha=4, dropout=0.0))
    trainer = _trainer(tokenizer, model, tmp_path, "tvaccine", rho=3.0)
    seen = _spy(trainer)
    trainer.training_step(model, dict(_batch(tokenizer)))
    active = trainer.active_layers
    assert len(active) == 2 and sorted(seen) == active
    assert _global_norm(seen.values()) == pytest.approx(3.0, rel=1e-5)
    for i, layer in enumerate(decoder_layers(model)):
        attn = [(n, p) for n, p in layer.self_attn.named_parameters() if "lora_" in n]
        mlp = [(n, p) for n, p in layer.mlp.named_parameters() if "lora_" in n]
        assert attn and mlp
        for _, p in attn:
            assert p.requires_grad == (i in active)
            assert (p.grad is not None) == (i in active)
        assert all(p.requires_grad for _, p in mlp)  # official: MLP LoRA stays trainable
    trainer.restore_model()
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_tvaccine_full_finetuning_freezes_unselected_attention_and_optionally_mlp(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=4, seed=4)
    trainer = _trainer(tokenizer, model, tmp_path, "tvaccine", train_unselected_mlp=False)
    trainer.training_step(model, dict(_batch(tokenizer)))
    active = set(trainer.active_layers)
    for i, layer in enumerate(decoder_layers(model)):
        for p in layer.parameters():
            assert p.requires_grad == (i in active)
    assert model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad


def test_tvaccine_scores_are_output_gradient_norms_and_dominant_layers_are_chosen(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=4, seed=5)
    with torch.no_grad():  # layer 2 amplifies its input: the gradient at layers 0 and 1 dominates
        model.model.layers[2].input_layernorm.weight.mul_(1e4)
    trainer = _trainer(tokenizer, model, tmp_path, "tvaccine", lisa_activated_layers=2)
    batch = trainer.harmful_batch(0)
    norms = trainer.score_layers(model.train(), batch)
    ref = _output_grads(model, batch, [0, 1, 2, 3])
    assert norms == pytest.approx([ref[i].norm().item() for i in range(4)], rel=1e-4)
    probs = trainer.probabilities(norms)
    assert sum(probs) == pytest.approx(1.0) and probs[0] + probs[1] > 0.999
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no parameter gradient
    for step in range(0, 200, 20):
        assert trainer.select_layers(probs, step) == [0, 1]
    trainer.training_step(model, dict(_batch(tokenizer)))
    assert trainer.active_layers == [0, 1]


def test_layer_draws_follow_the_probabilities_without_replacement(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, make_model(len(tokenizer), layers=4), tmp_path, "tvaccine",
                       lisa_activated_layers=1)
    probs = [0.5, 0.3, 0.15, 0.05]
    counts = torch.zeros(4)
    for step in range(3000):
        counts[trainer.select_layers(probs, step)[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor(probs), atol=0.03)
    trainer.args.lisa_activated_layers = 3
    draws = [trainer.select_layers(probs, s) for s in range(50)]
    assert all(len(set(d)) == 3 and d == sorted(d) for d in draws)
    with pytest.raises(SinkguardError, match="non-zero"):
        trainer.select_layers([0.5, 0.5, 0.0, 0.0], 0)


def test_tvaccine_reselects_every_j_steps_and_rescores_every_k(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, make_model(len(tokenizer), layers=4, seed=6), tmp_path, "tvaccine",
                       lisa_interval_steps=2, probability_steps=3)
    calls = {"score": [], "select": []}
    score, select = trainer.score_layers, trainer.select_layers
    trainer.score_layers = lambda m, b: calls["score"].append(trainer.state.global_step) or score(m, b)
    trainer.select_layers = lambda p, s: calls["select"].append(s) or select(p, s)
    for step in range(7):
        trainer.state.global_step = step
        for _ in range(2):  # two micro-batches per optimizer step
            trainer.prepare_step(trainer.model)
    assert calls == {"score": [0, 3, 6], "select": [0, 2, 4, 6]}


def test_unselected_layers_are_checkpointed_exactly_or_as_the_official_reentrant_way(tokenizer, tmp_path):
    from peft import get_peft_model

    batch = _batch(tokenizer)
    grads = {}
    for mode, opts in {"none": dict(checkpoint_unselected=False), "exact": dict(checkpoint_reentrant=False),
                       "reentrant": dict(checkpoint_reentrant=True)}.items():
        model = get_peft_model(make_model(len(tokenizer), layers=4, seed=7), lora_config(r=4, alpha=4, dropout=0.0))
        trainer = _trainer(tokenizer, model, tmp_path / mode, "tvaccine", previous_layer_threshold=100, **opts)
        trainer.active_layers, trainer.layer_probabilities = [2, 3], [0.25] * 4
        trainer.state.global_step = 1  # no scoring or redraw this step
        trainer.training_step(model, dict(batch))
        layers = decoder_layers(model)
        if mode != "none":
            assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False]
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        trainer.restore_model()
        assert not any(layer.gradient_checkpointing for layer in layers)
    for n, g in grads["none"].items():
        if g is None:
            assert grads["exact"][n] is None
        else:
            torch.testing.assert_close(grads["exact"][n], g, rtol=1e-4, atol=1e-6)
    # Reentrant checkpointing (torch 2.1's default, the official run): with frozen embeddings the
    # checkpointed layers below the first full layer get no gradient, MLP LoRA included.
    below = [n for n in grads["none"] if ".layers.0." in n or ".layers.1." in n]
    assert any(grads["none"][n] is not None for n in below)
    assert below and all(grads["reentrant"][n] is None for n in below)
    for n, g in grads["none"].items():
        if (".layers.2." in n or ".layers.3." in n) and g is not None:
            torch.testing.assert_close(grads["reentrant"][n], g, rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_in_deep_models_still_trains_the_mlp_below_the_lowest_chosen_layer(
        tokenizer, tmp_path):
    """Official run, more layers than previous_layer_threshold: the layer below the lowest chosen one
    runs un-checkpointed, so its MLP LoRA gets a gradient; the layers below it get none."""
    from peft import get_peft_model

    model = get_peft_model(make_model(len(tokenizer), layers=4, seed=7), lora_config(r=4, alpha=4, dropout=0.0))
    trainer = _trainer(tokenizer, model, tmp_path, "tvaccine", previous_layer_threshold=3)
    trainer.active_layers, trainer.layer_probabilities = [2, 3], [0.25] * 4
    trainer.state.global_step = 1  # no scoring or redraw this step
    trainer.training_step(model, dict(_batch(tokenizer)))
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, False, False, False]
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if ".layers.0." in n)
    assert all(g is None for n, g in grads.items() if ".layers.1.self_attn" in n)
    mlp_below = [g for n, g in grads.items() if ".layers.1.mlp" in n and "lora_B" in n]  # lora_A: zero (B starts at 0)
    assert len(mlp_below) == 3 and all(g is not None and g.abs().sum() > 0 for g in mlp_below)
    trainer.restore_model()


def test_previous_layers_run_uncheckpointed_in_deep_models(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, make_model(len(tokenizer), layers=4), tmp_path, "tvaccine",
                       previous_layer_threshold=3)
    assert trainer.full_layers([0, 2]) == {0, 1, 2}
    trainer.args.previous_layer_threshold = 4
    assert trainer.full_layers([0, 2]) == {0, 2}


def _logged_tvaccine(tokenizer, tmp_path, **overrides):
    """A LoRA T-Vaccine trainer (J=2, K=3, 8 steps) that logs its scorings, draws and active layers."""
    from peft import get_peft_model

    model = get_peft_model(make_model(len(tokenizer), layers=4, seed=9), lora_config(r=4, alpha=4, dropout=0.1))
    trainer = _trainer(tokenizer, model, tmp_path, "tvaccine", max_steps=8, lisa_interval_steps=2,
                       probability_steps=3, lisa_activated_layers=2, **overrides)
    trainer.events = []
    score, select, prepare = trainer.score_layers, trainer.select_layers, trainer.prepare_step

    def logged_score(m, batch):
        norms = score(m, batch)
        trainer.events.append(("score", trainer.state.global_step, norms))
        return norms

    def logged_select(probabilities, step):
        picks = select(probabilities, step)
        trainer.events.append(("draw", step, picks))
        return picks

    def logged_prepare(m):
        new = trainer._prepared_step != trainer.state.global_step
        prepare(m)
        if new:
            trainer.events.append(("active", trainer.state.global_step, list(trainer.active_layers)))

    trainer.score_layers, trainer.select_layers, trainer.prepare_step = logged_score, logged_select, logged_prepare
    return model, trainer


def test_tvaccine_resumed_run_scores_draws_and_trains_like_an_uninterrupted_one(tokenizer, tmp_path):
    """Interrupt after step 5 (between scorings at 0, 3, 6 and draws at 0, 2, 4, 6), resume from the
    checkpoint: the same scorings and draws at the same steps, the same final weights."""
    full_model, full = _logged_tvaccine(tokenizer, tmp_path / "full")
    full.train()
    _, first = _logged_tvaccine(tokenizer, tmp_path / "cut", save_strategy="steps", save_steps=5)
    first.add_callback(stop_at(5))
    first.train()
    assert first.state.global_step == 5
    resumed_model, resumed = _logged_tvaccine(tokenizer, tmp_path / "cut", save_strategy="steps", save_steps=5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoints" / "checkpoint-5"))

    assert [(kind, step) for kind, step, _ in full.events if kind != "active"] == [
        ("score", 0), ("draw", 0), ("draw", 2), ("score", 3), ("draw", 4), ("score", 6), ("draw", 6)]
    assert first.events + resumed.events == full.events
    assert len({tuple(layers) for kind, _, layers in full.events if kind == "active"}) > 1  # draws vary
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("defense", ["vaccine", "tvaccine"])
def test_short_alignment_run_lowers_the_loss(tokenizer, tmp_path, defense):
    model = make_model(len(tokenizer), layers=3, seed=8)
    trainer = _trainer(tokenizer, model, tmp_path, defense, max_steps=6, rho=0.5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "clean_loss" in h]
    assert len(logs) == 6
    assert logs[-1]["clean_loss"] < 0.8 * logs[0]["clean_loss"]
    assert all(h["perturbation_norm"] == pytest.approx(0.5, rel=1e-4) for h in logs)
    if defense == "tvaccine":
        assert all(len(h["active_layers"].split(",")) == 2 for h in logs)
        assert all(p.requires_grad for p in model.parameters())  # restored after training


def test_errors_are_clear(tokenizer, tmp_path):
    with pytest.raises(SinkguardError, match="decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(SinkguardError, match="rho"):
        make_config("vaccine", "alignment", tmp_path, rho=-1.0)
    with pytest.raises(SinkguardError, match="lisa_interval_steps"):
        make_config("tvaccine", "alignment", tmp_path, lisa_interval_steps=0)
    with pytest.raises(SinkguardError, match="alignment-stage"):
        get_defense("tvaccine", "finetuning")
    model = make_model(len(tokenizer), layers=2)
    trainer = _trainer(tokenizer, model, tmp_path, "tvaccine", lisa_activated_layers=3)
    with pytest.raises(SinkguardError, match="exceeds"):
        trainer.training_step(model, dict(_batch(tokenizer)))
    with pytest.raises(SinkguardError, match="harmful set"):
        get_defense("tvaccine").trainer_cls(model=model, args=trainer.args, train_dataset=[], harmful_set=[])


@pytest.mark.slow
def test_tvaccine_harmful_set_comes_from_the_unsafe_beavertails_pool(tokenizer, tmp_path):
    from sinkguard.data import reference_pools

    args = make_config("tvaccine", "alignment", tmp_path, prompt_data_size=200, max_length=64)
    rows = get_defense("tvaccine").trainer_cls.defense_inputs(args, tokenizer)["harmful_set"]
    harmful, _ = reference_pools()
    assert 0 < len(rows) <= 200
    assert rows[0] == encode_example(tokenizer, harmful[0]["prompt"], harmful[0]["response"],
                                     args.harmful_system_prompt, 64)
