"""Real-model checks on the bundled SmolLM2-135M (CI skips them: run `pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch

from sinkguard.data import encode_text, reference_pools
from sinkguard.models import load_model, load_tokenizer
from sinkguard.sink import sink_values, sink_values_eager

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


def test_bundled_model_is_dequantised_and_chats():
    model, tok = load_model(MODEL), load_tokenizer(MODEL)  # converts the GGUF once if not cached
    assert "quantization_config" not in model.config.to_dict()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_sink_values_match_eager_maps_on_the_bundled_model():
    torch.set_num_threads(2)
    model, tok = load_model(MODEL).eval(), load_tokenizer(MODEL)
    harmful, harmless = reference_pools()
    texts = [encode_text(tok, r["prompt"], r["response"], 256) for r in harmful[:2] + harmless[:2]]
    width = max(map(len, texts))
    ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in texts])
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
    with torch.no_grad():
        fast = sink_values(model, ids, mask)
        ref = sink_values_eager(model, ids, mask)
    assert fast.shape == (30, 9)
    assert torch.allclose(fast, ref, atol=1e-5)
