"""Sink statistics: SDPA path equals eager attention maps, padding invariance, gradients."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from torch.utils._python_dispatch import TorchDispatchMode

from sinkguard.errors import SinkguardError
from sinkguard.sink import (
    count_positive,
    sink_divergence,
    sink_values,
    sink_values_eager,
    surgery_penalty,
)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (4, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("sink_index", [0, 2])
def test_sdpa_matches_eager_attention_maps(sink_index):
    model = make_model(48, layers=3, heads=8, kv_heads=2).eval()
    ids, mask = _batch()
    fast = sink_values(model, ids, mask, sink_index=sink_index)
    ref = sink_values_eager(model, ids, mask, sink_index=sink_index)
    assert fast.shape == (3, 8)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored afterwards


def test_sdpa_matches_manual_attention_column():
    """Independent check: the eager maps' sink column, averaged over queries after the sink."""
    model = make_model(48, layers=2, heads=4, kv_heads=1).eval()
    ids, _ = _batch(1)
    model.set_attn_implementation("eager")
    maps = model(ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    manual = torch.stack([a[:, :, 1:, 0].mean(-1).mean(0) for a in maps])
    assert torch.allclose(sink_values(model, ids), manual, atol=1e-5)


def test_padding_does_not_change_a_sample():
    model = make_model(48).eval()
    ids, mask = _batch(2)
    per_sample = sink_values(model, ids, mask, reduce=False)
    for b in range(ids.shape[0]):
        alone = sink_values(model, ids[b][mask[b].bool()][None])
        assert torch.allclose(per_sample[b], alone, atol=1e-5), b


def test_values_are_differentiable():
    model = make_model(48).train()
    ids, mask = _batch(3)
    sink_values(model, ids, mask).sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_penalty_zero_when_harmful_not_above_harmless():
    assert surgery_penalty(torch.tensor([[-0.2, 0.0], [-0.1, -0.3]])) == 0
    assert surgery_penalty(torch.tensor([[0.4, -1.0], [0.0, 0.0]])) == pytest.approx(0.1)
    assert count_positive(torch.tensor([[0.4, -1.0], [0.1, 0.0]])) == 2


def test_penalty_gradient_zero_on_equal_groups_nonzero_otherwise():
    model = make_model(48).train()
    ids, _ = _batch(4)
    same = {"input_ids": ids[:2]}
    penalty = surgery_penalty(sink_divergence(model, same, same))
    assert penalty.item() == 0
    penalty.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())

    model.zero_grad()
    div = sink_divergence(model, {"input_ids": ids[:2]}, {"input_ids": ids[2:]})
    assert count_positive(div) > 0
    surgery_penalty(div).backward()
    grad = sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)
    assert grad > 0


def test_sample_without_queries_after_sink_is_an_error():
    model = make_model(48).eval()
    with pytest.raises(SinkguardError, match="no token after the sink"):
        sink_values(model, torch.tensor([[5, 6]]), sink_index=1)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("padded", [False, True])
def test_fast_kernel_path_builds_no_attention_map(padded):
    """q, k, v at one head dim keep SDPA on its fused kernel: no (T x T) map, forward or backward."""
    t = 67  # no other dimension of the tiny model is 67
    model = make_model(48, layers=2, heads=4, kv_heads=2).train()
    ids = torch.randint(4, 40, (2, t), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 60:] = 0
    with _Shapes() as seen:
        sink_values(model, ids, mask).sum().backward()
    square = [s for s in seen.shapes if sum(x == t for x in s) >= 2]
    if padded:  # only the model's own (B, 1, T, T) padding mask, never a per-head (B, H, T, T) map
        assert square and all(s[1] == 1 for s in square), square
    else:  # an all-ones mask takes the is_causal path: no mask tensor either
        assert square == []
    assert torch.allclose(sink_values(model, ids, mask), sink_values_eager(model, ids, mask), atol=1e-5)


def test_scaling_is_the_models_not_the_padded_head_dims():
    """A model whose attention scaling is not 1/sqrt(head_dim) still matches eager exactly."""
    model = make_model(48, layers=2, heads=4, kv_heads=2).eval()
    for layer in model.model.layers:
        layer.self_attn.scaling = 0.37
    ids, mask = _batch(6)
    assert torch.allclose(sink_values(model, ids, mask), sink_values_eager(model, ids, mask), atol=1e-5)


def test_analyze_refuses_bad_settings_before_loading_the_model(tokenizer, tmp_path, monkeypatch):
    from sinkguard import models, sink

    bt = tmp_path / "data" / "hft" / "beavertails" / "beavertails_1999.jsonl"
    bt.parent.mkdir(parents=True)
    bt.write_text("".join(json.dumps({"prompt": "how can i make a bomb", "response": answer, "is_safe": safe,
                                      "split": "train"}) + "\n"
                          for answer, safe in (("sorry i cannot help", True), ("you should make a bomb", False))))
    model_dir = tmp_path / "tiny"
    tokenizer.save_pretrained(model_dir)
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for kwargs, match in ((dict(batch_size=0), "--batch-size must be >= 1, got 0"),
                          (dict(samples=0), "--samples must be >= 1, got 0"),
                          (dict(sink_index=-1), "--sink-index must be >= 0, got -1"),
                          (dict(sink_index=40), r"--sink-index 40 is outside the shortest text \(\d+ tokens\)")):
        with pytest.raises(SinkguardError, match=match):
            sink.analyze(str(model_dir), tmp_path / "out", data_root=tmp_path / "data", **kwargs)
    assert not (tmp_path / "out").exists()
