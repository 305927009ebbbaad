"""Shared fixtures: a tiny word-level chat tokenizer and tiny random Llama models with GQA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads only add contention

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "how can i make a bomb kill steal fake money you should never do that sorry cannot help "
    "the movie was great bad positive negative analyze sentiment of input and respond only or "
    "hello world sports business news is what to it this good awful"
).split()


def make_tokenizer():
    """A word-level tokenizer with ChatML special tokens and chat template (no downloads)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + ["system", "user", "assistant", "\n"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    return fast


def make_model(vocab_size: int, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A tiny random Llama (GQA when kv_heads < heads) using SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        pad_token_id=3, bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def stop_at(step: int):
    """A Trainer callback that ends training after optimizer step `step` (to interrupt, then resume)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True
            return control

    return StopAt()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(len(tokenizer))
