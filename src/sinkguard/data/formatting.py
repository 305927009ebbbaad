"""Chat-template formatting with the prompt masked out of the labels, and a padding collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
# The Surgery / official task scripts' system prompt: fine-tuning rows, T-Vaccine's scoring set, FA prompts.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def messages(prompt: str, response: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """A chat: optional system turn, the user's prompt and, when given, the assistant's answer."""
    chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    chat.append({"role": "user", "content": prompt})
    if response is not None:
        chat.append({"role": "assistant", "content": response})
    return chat


def _ids(tokenizer, chat: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode_example(
    tokenizer, prompt: str, response: str, system_prompt: str | None = None, max_length: int = 512
) -> dict[str, list[int]]:
    """Token ids of the full chat and labels that are -100 on the prompt (loss on the answer only)."""
    prompt_ids = _ids(tokenizer, messages(prompt, None, system_prompt), add_generation_prompt=True)
    full_ids = _ids(tokenizer, messages(prompt, response, system_prompt), add_generation_prompt=False)
    n_prompt = len(prompt_ids) if full_ids[: len(prompt_ids)] == prompt_ids else _common_prefix(prompt_ids, full_ids)
    full_ids = full_ids[:max_length]
    labels = [IGNORE_INDEX] * min(n_prompt, len(full_ids)) + full_ids[n_prompt:]
    return {"input_ids": full_ids, "labels": labels}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_text(tokenizer, prompt: str, response: str, max_length: int = 512) -> list[int]:
    """A (prompt, response) pair as one chat with no system prompt: Surgery's pool texts."""
    return _ids(tokenizer, messages(prompt, response), add_generation_prompt=False)[:max_length]


@dataclass
class PadCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask`."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        import torch  # here, not at import: the CLI validates its flags before torch loads

        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            if "labels" in f:
                batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        if not batch["labels"]:
            del batch["labels"]
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
