"""Offline size facts of the papers' models and a per-device memory / token estimate for a dry run.

The named models' configs cannot be fetched offline, so the few numbers the estimate needs are
shipped here (from each model's published `config.json`). Estimates are planning figures, not
measurements: weights + gradients + AdamW states for the trainable parameters, sharded when the
engine shards them, plus activations of one micro-batch (fused attention: no T x T maps).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SinkguardError


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs of a decoder-only transformer (names as in transformers' configs)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention projections, gated MLP, two norms."""
        h, d = self.hidden_size, self.dim
        attn = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2
        return attn + 3 * h * self.intermediate_size + 2 * h

    def params(self) -> int:
        """All parameters (embeddings, layers, final norm, LM head unless tied)."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.num_hidden_layers * self.layer_params() + self.hidden_size

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """Trainable LoRA parameters: r x (in + out) per adapted projection per layer."""
        h, d, i = self.hidden_size, self.dim, self.intermediate_size
        shapes = {"q_proj": (h, self.num_attention_heads * d), "k_proj": (h, self.num_key_value_heads * d),
                  "v_proj": (h, self.num_key_value_heads * d), "o_proj": (self.num_attention_heads * d, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise SinkguardError(f"unknown LoRA target(s) {', '.join(unknown)}; known: {', '.join(shapes)}")
        return self.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


# From the models' published config.json files.
PAPER_MODELS: dict[str, ModelFacts] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelFacts(4096, 32, 32, 8, 14336, 128256),
    "meta-llama/Meta-Llama-3-8B": ModelFacts(4096, 32, 32, 8, 14336, 128256),
    "meta-llama/Llama-2-7b-hf": ModelFacts(4096, 32, 32, 32, 11008, 32000),
    "meta-llama/Llama-2-7b-chat-hf": ModelFacts(4096, 32, 32, 32, 11008, 32000),
    "Qwen/Qwen2-7B": ModelFacts(3584, 28, 28, 4, 18944, 152064),
    "Qwen/Qwen2-7B-Instruct": ModelFacts(3584, 28, 28, 4, 18944, 152064),
    "google/gemma-2-9b": ModelFacts(3584, 42, 16, 8, 14336, 256000, head_dim=256, tie_word_embeddings=True),
    "google/gemma-2-9b-it": ModelFacts(3584, 42, 16, 8, 14336, 256000, head_dim=256, tie_word_embeddings=True),
}

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_facts(name: str) -> ModelFacts:
    """Shipped facts of a paper model; an error listing the known ones otherwise."""
    if name not in PAPER_MODELS:
        raise SinkguardError(f"no shipped size facts for {name!r}; known: {', '.join(PAPER_MODELS)}")
    return PAPER_MODELS[name]


def memory_per_device(facts: ModelFacts, *, dtype: str = "bfloat16", batch: int = 1, seq: int = 512,
                      lora_r: int | None = None, lora_targets: tuple[str, ...] = (), shards: int = 1,
                      extra_tokens: int = 0) -> dict[str, float]:
    """GiB per device: weights, gradients, AdamW states, activations (one micro-batch), total.

    `shards` divides what FSDP full shard / ZeRO-3 partitions (weights, gradients, optimizer);
    `extra_tokens` are tokens of extra forwards kept for the same backward (e.g. Surgery's pools
    under penalty_backward='joint'). Activations: about 34 bytes x hidden per token and layer in 16-bit
    (Korthikanti et al. 2022, fused attention) plus the fp32 logits and their gradient.
    """
    if dtype not in BYTES:
        raise SinkguardError(f"dtype must be one of {', '.join(BYTES)}, not {dtype!r}")
    b = BYTES[dtype]
    total = facts.params()
    trainable = facts.lora_params(lora_r, lora_targets) if lora_r else total
    gib = 2**30
    weights = total * b / shards
    grads = trainable * b / (1 if lora_r else shards)
    optimizer = 2 * trainable * 4 / (1 if lora_r else shards)  # AdamW moments kept in fp32
    tokens = batch * seq
    act_scale = (34 if b == 2 else 68) * facts.hidden_size * facts.num_hidden_layers
    activations = (tokens + extra_tokens) * act_scale + tokens * facts.vocab_size * 4 * 2
    out = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations}
    out = {k: v / gib for k, v in out.items()}
    out["total"] = sum(out.values())
    return {k: round(v, 2) for k, v in out.items()}
