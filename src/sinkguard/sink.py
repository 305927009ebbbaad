"""Attention-sink statistics: attention paid to the sink token per (layer, head), and its divergence.

The sink column of every head is read from the model's own SDPA call without any seq x seq map:
we append an indicator channel to the values that is 1 at the sink key and 0 elsewhere, so the
attention output's extra channel at query i is exactly sum_j A[i, j] * 1[j = sink] = A[i, sink].
Query and key are zero-padded to the values' head dim (the model's scaling is passed explicitly),
so SDPA stays on its fused kernels, and an all-ones mask keeps the `is_causal` path (no mask
tensor at all). It is differentiable through the fused SDPA backward and handles GQA and padding
masks the same way the model's attention does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .errors import SinkguardError

ATTN_NAME = "sinkguard_sdpa"
_state = threading.local()
_registered = False


def _sink_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """SDPA that also records each query's attention weight on the sink key while recording is on.

    The indicator channel is appended to the values and query and key are zero-padded to the same
    head dim (a multiple of 8 on CUDA), with the model's own scaling passed explicitly: zero
    channels add nothing to q.k, and equal head dims keep SDPA on its fused (flash /
    memory-efficient) kernels instead of the math fallback that builds the T x T map.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = getattr(_state, "recorder", None)
    if rec is None or query.shape[2] != key.shape[2] or key.shape[2] != rec.indicator.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, h_kv, t, d = value.shape
    width = max(query.shape[-1], d + 1)
    if query.is_cuda:
        width = -(-width // 8) * 8  # the fused CUDA kernels need head dims in multiples of 8
    if kwargs.get("scaling") is None:
        kwargs["scaling"] = query.shape[-1] ** -0.5  # SDPA's default for the unpadded head dim
    pad_qk = width - query.shape[-1]
    query = torch.nn.functional.pad(query, (0, pad_qk))
    key = torch.nn.functional.pad(key, (0, pad_qk))
    indicator = rec.indicator.to(value.dtype)[:, None, :, None].expand(b, h_kv, t, 1)
    parts = [value, indicator]
    if width > d + 1:
        parts.append(value.new_zeros(b, h_kv, t, width - d - 1))
    out, _ = sdpa_attention_forward(module, query, key, torch.cat(parts, dim=-1), attention_mask, **kwargs)
    rec.columns.append(out[..., d].transpose(1, 2))  # (B, H, T): A[b, h, i, sink_b]
    return out[..., :d].contiguous(), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _sink_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def unwrap(model):
    """The transformers `PreTrainedModel` inside a peft / DDP / accelerate wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def num_layers_heads(model) -> tuple[int, int]:
    """(decoder layers, query heads per layer) from the model config."""
    cfg = unwrap(model).config
    cfg = getattr(cfg, "text_config", None) or cfg
    return cfg.num_hidden_layers, cfg.num_attention_heads


class _Recorder:
    def __init__(self, indicator: Tensor) -> None:
        self.indicator = indicator
        self.columns: list[Tensor] = []


@contextmanager
def instrumented(model) -> Iterator[None]:
    """Run `model` with sinkguard's recording SDPA attention (identical outputs to plain SDPA)."""
    hf = unwrap(model)
    if not hasattr(hf, "set_attn_implementation") or not hf._can_set_attn_implementation():
        raise SinkguardError(
            f"{type(hf).__name__} cannot be instrumented for sink statistics: its attention does not "
            "use transformers' AttentionInterface; use sink_values_eager (output_attentions) instead"
        )
    _register()
    previous = hf.config._attn_implementation
    if previous != ATTN_NAME:
        hf.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        if previous != ATTN_NAME:
            hf.set_attn_implementation(previous)


def _sink_positions(attention_mask: Tensor, sink_index: int) -> Tensor:
    """Per sample, the key position of the sink: `sink_index` tokens after the first real token."""
    first = attention_mask.long().argmax(dim=1)  # works for left and right padding
    return first + sink_index


def _query_weights(attention_mask: Tensor, sink_pos: Tensor) -> Tensor:
    """(B, T) weights averaging each sample over its real query positions after the sink."""
    t = attention_mask.shape[1]
    after = torch.arange(t, device=attention_mask.device)[None, :] > sink_pos[:, None]
    valid = attention_mask.bool() & after
    counts = valid.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise SinkguardError("a sample has no token after the sink position: use longer texts")
    return valid.to(torch.float32) / counts


def sink_values(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    sink_index: int = 0,
    reduce: bool = True,
) -> Tensor:
    """Tensor[L, H]: mean attention on the sink token, per layer and query head, batch-averaged.

    Each sample is averaged over its own non-padding queries after the sink, then samples are
    averaged (`reduce=False` returns the per-sample Tensor[B, L, H]). Differentiable; works
    under SDPA without materialising attention maps.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    sink_pos = _sink_positions(attention_mask, sink_index)
    indicator = torch.nn.functional.one_hot(sink_pos, input_ids.shape[1]).to(torch.float32)
    recorder = _Recorder(indicator)
    # The decoder alone: the sink needs every attention layer but never the LM head's logits.
    hf = unwrap(model)
    body = hf.get_decoder() if hasattr(hf, "get_decoder") else hf
    with instrumented(model):
        _state.recorder = recorder
        try:
            body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            _state.recorder = None
    n_layers, n_heads = num_layers_heads(model)
    if len(recorder.columns) != n_layers:
        raise SinkguardError(
            f"recorded {len(recorder.columns)} attention layers, expected {n_layers}: this model's "
            "attention cannot be instrumented; use sink_values_eager instead"
        )
    weights = _query_weights(attention_mask, sink_pos)
    cols = torch.stack(recorder.columns)  # (L, B, H, T)
    per_sample = (cols.float() * weights[None, :, None, :]).sum(-1)  # (L, B, H)
    return per_sample.mean(dim=1) if reduce else per_sample.transpose(0, 1)


def sink_values_eager(
    model, input_ids: Tensor, attention_mask: Tensor | None = None, sink_index: int = 0
) -> Tensor:
    """Reference statistic from full eager attention maps (`output_attentions=True`), as the official code."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hf = unwrap(model)
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False
        )
    finally:
        hf.set_attn_implementation(previous)
    sink_pos = _sink_positions(attention_mask, sink_index)
    weights = _query_weights(attention_mask, sink_pos)
    rows = []
    for att in out.attentions:  # (B, H, T, T)
        col = att.gather(3, sink_pos[:, None, None, None].expand(*att.shape[:3], 1))[..., 0]
        rows.append((col.float() * weights[:, None, :]).sum(-1).mean(0))
    return torch.stack(rows)


def sink_divergence(
    model, harmful: dict[str, Tensor], harmless: dict[str, Tensor], sink_index: int = 0
) -> Tensor:
    """Tensor[L, H] = sink_values(harmful batch) - sink_values(harmless batch)."""
    return sink_values(model, harmful["input_ids"], harmful.get("attention_mask"), sink_index) - sink_values(
        model, harmless["input_ids"], harmless.get("attention_mask"), sink_index
    )


def surgery_penalty(divergence: Tensor) -> Tensor:
    """Surgery's regulariser: mean over all (layer, head) of relu(divergence)."""
    return torch.relu(divergence).mean()


@torch.no_grad()
def mean_sink_values(
    model, texts: list[list[int]], pad_token_id: int, batch_size: int = 8, sink_index: int = 0,
    desc: str = "sink values",
) -> Tensor:
    """Tensor[L, H]: sink values averaged over many tokenised texts, in padded mini-batches."""
    from tqdm.auto import tqdm

    from .data import PadCollator

    collate = PadCollator(pad_token_id)
    device = next(model.parameters()).device
    total = None
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths, less padding
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = collate([{"input_ids": texts[i]} for i in order[start : start + batch_size]])
        values = sink_values(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), sink_index, reduce=False
        ).sum(0)
        total = values if total is None else total + values
    return total / len(texts)


def count_positive(divergence: Tensor) -> int:
    """Number of (layer, head) pairs with positive sink divergence."""
    return int((divergence > 0).sum().item())


def analyze(model_name: str, out: str | os.PathLike, samples: int = 64, split: str = "train",
            sink_index: int = 0, batch_size: int = 8, max_length: int = 512, data_root=None,
            template: str = "chat") -> dict:
    """Compute, save and return the divergence summary of `model_name` (JSON + heatmap in `out`); the
    (prompt, response) texts are in `template`, the format the model was trained with."""
    from .data import encode_text, load_source, reference_pools
    from .io import write_json
    from .models import load_model, load_tokenizer
    from .report import plot_sink_heatmap

    for flag, value, lo in (("--samples", samples, 1), ("--batch-size", batch_size, 1), ("--sink-index", sink_index, 0),
                            ("--max-length", max_length, 1)):
        if value < lo:
            raise SinkguardError(f"{flag} must be >= {lo}, got {value}")
    if split == "train":
        harmful, harmless = reference_pools(data_root)
    else:
        rows = load_source("beavertails", split, data_root)
        harmful = [r for r in rows if not r["is_safe"]]
        harmless = [r for r in rows if r["is_safe"]]
    harmful, harmless = harmful[:samples], harmless[:samples]
    tokenizer = load_tokenizer(model_name)
    texts = {name: [encode_text(tokenizer, r["prompt"], r["response"], max_length, template) for r in rows]
             for name, rows in (("harmful", harmful), ("harmless", harmless))}
    shortest = min(len(t) for group in texts.values() for t in group)
    if sink_index >= shortest:
        raise SinkguardError(f"--sink-index {sink_index} is outside the shortest text ({shortest} tokens); "
                             f"give an index below {shortest} (0: the first token, the usual sink)")
    model = load_model(model_name).eval()
    with torch.no_grad():
        div = mean_sink_values(model, texts["harmful"], tokenizer.pad_token_id, batch_size, sink_index,
                               "harmful") - mean_sink_values(
            model, texts["harmless"], tokenizer.pad_token_id, batch_size, sink_index, "harmless")
    out = Path(out)
    positive = count_positive(div)
    summary = {
        "model": str(model_name), "positive_heads": positive, "total_heads": div.numel(),
        "layers": div.shape[0], "heads": div.shape[1], "mean_divergence": float(div.mean()),
        "settings": {"samples_harmful": len(harmful), "samples_harmless": len(harmless),
                     "split": split, "sink_index": sink_index, "max_length": max_length, "template": template},
        "divergence": [[round(float(x), 7) for x in row] for row in div],
    }
    write_json(out / "sink_divergence.json", summary)
    plot_sink_heatmap(div, out / "sink_divergence.png",
                      f"{Path(str(model_name)).name}: {positive}/{div.numel()} heads with positive divergence")
    return summary
