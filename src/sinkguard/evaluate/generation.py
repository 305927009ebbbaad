"""Batched greedy generation with left padding, written row by row to JSONL so a run resumes.

Prompts are rendered with the model's chat template (default) or the Alpaca template the
official harmful-score script uses (`template="alpaca"`; task rows with a separate input in its
input variant, as the official SST2 / AG News evaluation scripts). With `out_path`, every finished batch
is appended to a JSONL file (one flushed, fsynced line per prompt); a rerun reuses the rows whose
index, rendered input and settings (model weights, `max_new_tokens`, greedy decoding) match, and
refuses rows made under other settings instead of silently reusing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.formatting import alpaca_prompt, check_template, messages
from ..errors import SinkguardError
from ..io import read_text, write_jsonl

log = logging.getLogger(__name__)


def render_prompt(tokenizer, prompt: str, template: str = "chat", system_prompt: str | None = None,
                  instruction_input: tuple[str, str] | None = None) -> str:
    """The text the model is conditioned on: chat template with generation prompt, or Alpaca (its input
    variant for `instruction_input`, a task row's `task_input`)."""
    if template == "alpaca":
        if system_prompt:
            raise SinkguardError("a system prompt needs the chat template; drop it or use template 'chat'")
        return alpaca_prompt(prompt, instruction_input)
    check_template(template)
    if not getattr(tokenizer, "chat_template", None):
        raise SinkguardError("this tokenizer has no chat template; use template 'alpaca' (--template alpaca)")
    return tokenizer.apply_chat_template(
        messages(prompt, None, system_prompt), tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer, text: str, template: str = "chat") -> list[int]:
    """Token ids of a rendered prompt: the chat template carries its own special tokens."""
    return list(tokenizer(text, add_special_tokens=template != "chat")["input_ids"])


def model_fingerprint(model: torch.nn.Module, values_per_tensor: int = 64) -> str:
    """A cheap hash of the weights (names, shapes and a strided sample of every tensor)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // values_per_tensor)
            sample = flat[::step][:values_per_tensor].to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def settings_key(model: torch.nn.Module, max_new_tokens: int) -> str:
    """What, besides the rendered input, decides an answer: the weights and the decoding."""
    return _sha(json.dumps({"model": model_fingerprint(model), "max_new_tokens": max_new_tokens,
                            "decoding": "greedy"}, sort_keys=True))


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise SinkguardError("the tokenizer has no end-of-sequence token; generation could not stop")
    return ids


DECODERS = ("shrinking", "hf")


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def _generate_batch(model, seqs: list[list[int]], max_new_tokens: int, pad_id: int,
                    eos_ids: list[int], decoder: str = "hf") -> list[list[int]]:
    """Greedy continuation of left-padded `seqs`; each result is cut at its first end token.

    `decoder="hf"` (default) is transformers' `generate`, which keeps every row to the end of the
    longest answer; `"shrinking"` drops a row from the batch, KV cache included, once it has
    ended. Both are greedy and give the same answers; the shrinking one measured no faster
    (0.95x, benchmarks/generation_speed.py) because most answers run to the length cap.
    """
    if decoder == "hf":
        return _generate_batch_hf(model, seqs, max_new_tokens, pad_id, eos_ids)
    if decoder != "shrinking":
        raise SinkguardError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    import inspect

    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids, mask = (t.to(device) for t in _left_pad(seqs, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # transformers >= 5.2x names the argument `cache`; earlier 5.x releases `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    results: list[list[int]] = [[] for _ in seqs]
    active = torch.arange(len(seqs), device=device)
    eos = torch.tensor(eos_ids, device=device)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
        last = positions[:, -1]
        for _ in range(max_new_tokens):
            tokens = logits.argmax(-1)
            ended = torch.isin(tokens, eos)
            for row, tok, end in zip(active.tolist(), tokens.tolist(), ended.tolist(), strict=True):
                if not end:
                    results[row].append(tok)
            keep = (~ended).nonzero().flatten()
            if keep.numel() == 0 or len(results[int(active[keep[0]])]) >= max_new_tokens:
                break  # every row ended, or the rows left reached the length cap (all share it)
            if keep.numel() < active.numel():
                cache.batch_select_indices(keep)
                active, tokens, mask, last = active[keep], tokens[keep], mask[keep], last[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last = last + 1
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                           use_cache=True, **{cache_arg: cache}).logits[:, -1]
    return results


def _generate_batch_hf(model, seqs: list[list[int]], max_new_tokens: int, pad_id: int,
                       eos_ids: list[int]) -> list[list[int]]:
    """Greedy continuation with transformers' `generate` (rows stay to the batch's end)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(seqs, pad_id)
    width = input_ids.shape[1]
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_ids, pad_token_id=pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)
    results = []
    for row in out[:, width:].tolist():
        cut = next((k for k, tok in enumerate(row) if tok in eos_ids), len(row))
        results.append(row[:cut])
    return results


def _read_rows(path: Path) -> list[dict]:
    """Rows already written; a torn last line (a crash mid-write) is dropped and the file repaired."""
    if not path.is_file():
        return []
    lines = read_text(path, "answers file").split("\n")
    rows, torn = [], False
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                torn = True
                continue
            raise SinkguardError(f"{path} line {k + 1} is not JSON; delete the file to regenerate") from None
    if torn or lines[-1].strip():  # also a complete row missing its newline: appends would glue onto it
        log.warning("%s: repairing a half-written last line", path)
        write_jsonl(path, rows)
    return rows


def _reusable(path: Path, rows: list[dict], keys: list[str], settings: str, overwrite: bool) -> dict[int, dict]:
    """Rows of this request already in the file, by index; stale rows raise (or are dropped)."""
    done: dict[int, dict] = {}
    for row in rows:
        i = row.get("index")
        if not isinstance(i, int) or "response" not in row:
            problem = "a row without index or response"
        elif row.get("settings") != settings:
            problem = f"row {i} was generated by other weights or max_new_tokens"
        elif i < len(keys) and row.get("input_sha") != keys[i]:
            problem = f"row {i} has another prompt, template or system prompt"
        else:
            if i < len(keys):
                done[i] = row
            continue
        if overwrite:
            log.warning("%s holds stale generations (%s): starting it afresh", path, problem)
            write_jsonl(path, [])
            return {}
        raise SinkguardError(
            f"{path} holds generations made under other settings ({problem}); "
            "use a new output folder, delete the file, or pass --overwrite (overwrite=True)"
        )
    return done


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    template: str = "chat",
    system_prompt: str | None = None,
    out_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "generating",
    decoder: str = "hf",
    instruction_inputs: Sequence[tuple[str, str] | None] | None = None,
) -> list[str]:
    """Greedy answers to `prompts` (same order), batched by length; resumable through `out_path`.
    `instruction_inputs`: per prompt, its row's `task_input` (see `render_prompt`).

    `decoder`: "hf" uses `model.generate` (default), "shrinking" drops finished rows from the
    batch; both decode greedily with a KV cache (`benchmarks/generation_speed.py` compares them).

    Each JSONL row holds `index`, `prompt`, `response`, `n_tokens` (new tokens before the end
    token), `input_sha` (hash of the rendered input) and `settings` (weights and decoding hash).
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise SinkguardError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise SinkguardError(f"batch size must be at least 1, got {batch_size}")
    prompts = list(prompts)
    pairs = list(instruction_inputs) if instruction_inputs is not None else [None] * len(prompts)
    if len(pairs) != len(prompts):
        raise SinkguardError(f"{len(pairs)} instruction inputs for {len(prompts)} prompts; give one per prompt")
    texts = [render_prompt(tokenizer, p, template, system_prompt, pair) for p, pair in zip(prompts, pairs)]
    ids = [encode_prompt(tokenizer, t, template) for t in texts]
    keys = [_sha(t) for t in texts]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    settings = settings_key(model, max_new_tokens)

    path = Path(out_path) if out_path is not None else None
    old_rows = _read_rows(path) if path else []
    done = _reusable(path, old_rows, keys, settings, overwrite) if path else {}
    if path and done:
        log.info("%s: reusing %d of %d generations", path, len(done), len(prompts))
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once.
    todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: (-len(ids[i]), i))

    was_training = model.training
    model.eval()
    fh = None
    try:
        if path and todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = path.open("a", encoding="utf-8")
        with tqdm(total=len(prompts), initial=len(done), desc=desc, unit="prompt", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                outs = _generate_batch(model, [ids[i] for i in batch], max_new_tokens, pad_id, eos_ids, decoder)
                lines = []
                for i, new in zip(batch, outs, strict=True):
                    done[i] = {"index": i, "prompt": prompts[i],
                               "response": tokenizer.decode(new, skip_special_tokens=True).strip(),
                               "n_tokens": len(new), "input_sha": keys[i], "settings": settings}
                    lines.append(json.dumps(done[i], ensure_ascii=False) + "\n")
                if fh is not None:
                    fh.write("".join(lines))
                    fh.flush()
                    os.fsync(fh.fileno())
                bar.update(len(batch))
    finally:
        if fh is not None:
            fh.close()
        model.train(was_training)
    if path:
        _compact(path)
    return [done[i]["response"] for i in range(len(prompts))]


def _compact(path: Path) -> None:
    """Rewrite the file sorted by index, so an interrupted-and-resumed run ends byte-identical."""
    rows = _read_rows(path)
    by_index = {row["index"]: row for row in rows}
    ordered = [by_index[i] for i in sorted(by_index)]
    if ordered != rows:
        write_jsonl(path, ordered)


def read_generations(path: str | os.PathLike) -> list[dict]:
    """The rows of a generations file, in index order."""
    rows = _read_rows(Path(path))
    return sorted(rows, key=lambda r: r["index"])
