"""Offline size facts of the papers' models and a per-device memory / token estimate for a dry run.

The named models' configs cannot be fetched offline, so the few numbers the estimate needs are
shipped here (from each model's published `config.json`). Estimates are planning figures, not
measurements: weights + gradients + AdamW states for the trainable parameters (sharded when the
engine shards them) + the copies a defense keeps + the activations of one micro-batch with every
example at the token limit (fused attention: no T x T maps). Not counted: the CUDA context, the
allocator's fragmentation, LoRA dropout's copies of the inputs, temporary buffers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import SinkguardError

GIB = 2**30


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs of a decoder-only transformer (names as in transformers' configs).

    `chat_template`: whether the tokenizer ships one (training formats rows with it); None: unknown.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    chat_template: bool | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelFacts:
        """Facts from a transformers `config.json` mapping (GQA-less configs: one KV head per head)."""
        names = {f.name for f in fields(cls)} - {"chat_template"}
        values = {k: config[k] for k in names if config.get(k) is not None}
        values.setdefault("num_key_value_heads", config["num_attention_heads"])
        return cls(**values)

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

    def activation_bytes(self, b: int) -> int:
        """Bytes the decoder keeps per token for backward with activations of `b` bytes (Llama-style,
        SDPA): per layer, two RMSNorms (float32 input + output, 2 (4 + b) h), q, k, v, the attention
        output and projections' inputs (b (5 h + 2 kv)), the gated MLP's four intermediates (4 b i);
        once, the final norm ((4 + b) h). Matches the saved tensors of a tiny Llama to a few per cent
        (tests/test_plan.py)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.dim
        layer = 2 * (4 + b) * h + b * (5 * h + 2 * kv + 4 * self.intermediate_size)
        return self.num_hidden_layers * layer + (4 + b) * h


# From the models' published config.json files (and whether their tokenizer ships a chat template).
PAPER_MODELS: dict[str, ModelFacts] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelFacts(4096, 32, 32, 8, 14336, 128256, chat_template=True),
    "meta-llama/Meta-Llama-3-8B": ModelFacts(4096, 32, 32, 8, 14336, 128256),
    "meta-llama/Llama-2-7b-hf": ModelFacts(4096, 32, 32, 32, 11008, 32000, chat_template=False),
    "meta-llama/Llama-2-7b-chat-hf": ModelFacts(4096, 32, 32, 32, 11008, 32000, chat_template=True),
    "Qwen/Qwen2-7B": ModelFacts(3584, 28, 28, 4, 18944, 152064),
    "Qwen/Qwen2-7B-Instruct": ModelFacts(3584, 28, 28, 4, 18944, 152064, chat_template=True),
    "google/gemma-2-9b": ModelFacts(3584, 42, 16, 8, 14336, 256000, head_dim=256, tie_word_embeddings=True),
    "google/gemma-2-9b-it": ModelFacts(3584, 42, 16, 8, 14336, 256000, head_dim=256, tie_word_embeddings=True,
                                       chat_template=True),
    # the bundled default (models.BUNDLED), so the shipped CPU configs get an estimate too
    "smollm2-135m-instruct": ModelFacts(576, 30, 9, 3, 1536, 49152, head_dim=64, tie_word_embeddings=True,
                                        chat_template=True),
}

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_facts(name: str) -> ModelFacts:
    """Shipped facts of a paper model; an error listing the known ones otherwise."""
    if name not in PAPER_MODELS:
        raise SinkguardError(f"no shipped size facts for {name!r}; known: {', '.join(PAPER_MODELS)}")
    return PAPER_MODELS[name]


def find_facts(name: str) -> ModelFacts | None:
    """Facts without a download: shipped, else a local model folder's or the hub cache's config.json."""
    if name in PAPER_MODELS:
        return PAPER_MODELS[name]
    path = Path(name).expanduser() / "config.json"
    if not path.is_file() and name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache  # reads the local cache only

        cached = try_to_load_from_cache(name, "config.json")
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return None
    try:
        return ModelFacts.from_config(json.loads(path.read_text(encoding="utf-8")))
    except (KeyError, TypeError, ValueError):
        return None


def memory_per_device(facts: ModelFacts, *, dtype: str = "bfloat16", batch: int = 1, seq: int = 512,
                      lora_r: int | None = None, lora_targets: tuple[str, ...] = (), shards: int = 1,
                      extra_tokens: int = 0, copies: int = 0, activation_dtype: str | None = None) -> dict[str, float]:
    """GiB per device: weights, gradients, AdamW states, a defense's copies, activations, total.

    Full fine-tuning trains the weights in `dtype` (torch's AdamW keeps its two moments in the
    parameters' dtype); `shards` divides weights, gradients, moments and copies (FSDP full shard /
    ZeRO-3). LoRA trains float32 adapters (peft upcasts them on a 16-bit model) on frozen weights
    and shards nothing (LoRA runs under DDP). `copies`: copies of the trainable parameters a defense
    keeps (Lisa's anchor, Booster's saved weights and gradients). Activations: one micro-batch of
    `batch` x `seq` tokens through the decoder (`activation_bytes`) plus the LM head's logits in
    `dtype`, their float32 log-softmax and its gradient; `extra_tokens` are tokens of extra
    decoder passes held for the same backward (e.g. Surgery's pools under penalty_backward='joint').
    `activation_dtype`: the activations' dtype when mixed precision computes in another (bf16: true).
    """
    for name in (dtype, activation_dtype or dtype):
        if name not in BYTES:
            raise SinkguardError(f"dtype must be one of {', '.join(BYTES)}, not {name!r}")
    b, ab = BYTES[dtype], BYTES[activation_dtype or dtype]
    total = facts.params()
    if lora_r:
        trainable, tb, shards = facts.lora_params(lora_r, lora_targets), 4, 1
        weights = total * b + trainable * tb
    else:
        trainable, tb = total, b
        weights = total * b / shards
    state = trainable * tb / shards
    tokens = batch * seq
    activations = (tokens + extra_tokens) * facts.activation_bytes(ab) + tokens * facts.vocab_size * (ab + 8)
    out = {"weights": weights, "gradients": state, "optimizer": 2 * state, "copies": copies * state,
           "activations": activations}
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


@dataclass(frozen=True)
class StepCost:
    """One micro-batch of a defense: tokens through the model, tokens of extra passes held for the same
    backward, copies of the trainable parameters it keeps, and what differs from an SFT step."""

    processed: int
    held: int = 0
    copies: int = 0
    note: str = ""


def step_cost(defense: str, stage: str, args: Any, tokens: int) -> StepCost:
    """The cost of one micro-batch of `tokens` (batch x token limit) under `defense` (its config `args`),
    from the methods' docs (docs/methods/*.md, "Cost"); a defense not listed costs an SFT step."""
    if defense == "surgery":
        pools = 2 * args.regularizer_batch_size * args.pool_max_length
        held = pools if args.penalty_backward == "joint" else max(0, pools - tokens)
        return StepCost(tokens + pools, held, 0, f"+ 2 pool passes of {args.regularizer_batch_size} x "
                        f"<= {args.pool_max_length} tokens ({args.penalty_backward} backward)")
    if defense in ("vaccine", "tvaccine"):
        return StepCost(2 * tokens, note="+ a second pass of the batch (perturbation)")
    if defense == "lisa":
        return StepCost(tokens, copies=1, note="+ the anchor copy")
    if defense == "repnoise":
        return StepCost(2 * tokens, held=tokens, note="+ the harmful batch in the same backward")
    if defense == "antibody" and stage == "finetuning":
        return StepCost(2 * tokens, note="+ a no-gradient refusal forward")
    if defense in ("booster", "panacea", "antibody"):
        harmful = args.harmful_batch_size * args.max_length
        passes = 3 if defense == "antibody" else 2
        extra = 1 if defense == "antibody" else 0
        return StepCost(tokens + passes * harmful, copies=3 + extra,
                        note=f"+ {passes} passes of {args.harmful_batch_size} harmful rows")
    return StepCost(tokens)


def stage_estimate(facts: ModelFacts | None, stage: Any, defense: str, steps: int, devices: int = 1) -> dict[str, Any]:
    """Memory per device (None without `facts`) and tokens of one training run of `defense` with the
    settings of `stage` (a `config.TrainingStage`); `devices` > 1: full fine-tuning sharded over them."""
    from .defenses.sft import LORA_TARGETS
    from .train import make_config, stage_arguments

    args = make_config(defense, stage.stage, "unused", **stage_arguments(stage, 0), **stage.defense_options(defense))
    tokens = args.per_device_train_batch_size * args.max_length
    cost = step_cost(defense, stage.stage, args, tokens)
    targets = tuple(getattr(args, "lora_target_modules", None) or LORA_TARGETS)
    mixed = "bfloat16" if getattr(args, "bf16", False) else "float16" if getattr(args, "fp16", False) else None
    memory = None if facts is None else memory_per_device(
        facts, dtype=stage.dtype, batch=args.per_device_train_batch_size, seq=args.max_length,
        lora_r=stage.lora.r if stage.lora else None, lora_targets=targets, shards=devices,
        extra_tokens=cost.held, copies=cost.copies, activation_dtype=mixed)
    return {"memory": memory, "tokens": steps * args.gradient_accumulation_steps * cost.processed,
            "batch": args.per_device_train_batch_size, "max_length": args.max_length,
            "grad_accum": args.gradient_accumulation_steps, "note": cost.note,
            "lora": f"LoRA r {stage.lora.r} on {', '.join(targets)}" if stage.lora else "full fine-tuning",
            "precision": f"{stage.dtype} weights" + (f", {mixed} autocast" if mixed and mixed != stage.dtype else "")}
