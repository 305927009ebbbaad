"""Training-row formatting (chat template or Alpaca prompt) with the prompt masked out of the labels,
and a padding collator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import SinkguardError

IGNORE_INDEX = -100
# The Surgery / official task scripts' system prompt: fine-tuning rows, T-Vaccine's scoring set, FA prompts.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Row formats: the tokenizer's chat template, or the Alpaca prompt of the official Llama-2 code.
TEMPLATES = ("chat", "alpaca")
# The Alpaca prompt (no-input variant) of T-Vaccine's, Booster's, Antidote's and Panacea's train.py
# PROMPT_DICT and of their evaluation scripts; Vaccine's and Lisa's (and Surgery's HS script) end
# without the final newline.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)
# Its input variant (the same PROMPT_DICT's prompt_input and the SST2 / AG News pred_eval.py), which
# the official code uses for every row whose `input` is not empty.
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def messages(prompt: str, response: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """A chat: optional system turn, the user's prompt and, when given, the assistant's answer."""
    chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    chat.append({"role": "user", "content": prompt})
    if response is not None:
        chat.append({"role": "assistant", "content": response})
    return chat


def task_input(row: dict) -> tuple[str, str] | None:
    """A row's (instruction, input) when it has a separate input (SST2, AG News), else None."""
    return (row["instruction"], row["input"]) if row.get("input") else None


def alpaca_prompt(prompt: str, instruction_input: tuple[str, str] | None = None) -> str:
    """The Alpaca prompt: the input variant of an (instruction, input) pair, else the no-input one of `prompt`."""
    if instruction_input:
        instruction, text = instruction_input
        return ALPACA_INPUT_TEMPLATE.format(instruction=instruction, input=text)
    return ALPACA_TEMPLATE.format(prompt=prompt)


def _ids(tokenizer, chat: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def check_template(template: str) -> None:
    """`template` is one of `TEMPLATES`; else one line naming the choices."""
    if template not in TEMPLATES:
        raise SinkguardError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def drop_system_prompts(config, template: str, label: Callable[[str], str] = str) -> None:
    """The Alpaca prompt has no system turn: with template alpaca, each `*system_prompt` field of
    dataclass `config` left at its default becomes None, any other non-empty one is an error."""
    if template != "alpaca":
        return
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not f.name.endswith("system_prompt") or not value:
            continue
        if value != f.default:
            raise SinkguardError(f"{label(f.name)} needs template chat (the Alpaca prompt has no system turn); "
                                 "leave it unset (null)")
        setattr(config, f.name, None)


def _alpaca(tokenizer, prompt: str, response: str, system_prompt: str | None,
            instruction_input: tuple[str, str] | None = None) -> tuple[list[int], int]:
    """(ids of prompt + answer + EOS, prompt token count) as the official train.py: the Alpaca prompt
    (`alpaca_prompt`) and `response + eos_token` tokenised as one text (special tokens, e.g. BOS,
    added), the prompt alone for the count."""
    if system_prompt:
        raise SinkguardError("a system prompt needs template chat (the Alpaca prompt has no system turn); drop it")
    if tokenizer.eos_token is None:
        raise SinkguardError("the Alpaca format ends each answer with the tokenizer's EOS token, and this "
                             "tokenizer has none")
    source = alpaca_prompt(prompt, instruction_input)
    n_prompt = len(tokenizer(source)["input_ids"])
    return list(tokenizer(source + response + tokenizer.eos_token)["input_ids"]), n_prompt


def encode_example(
    tokenizer, prompt: str, response: str, system_prompt: str | None = None, max_length: int = 512,
    template: str = "chat", instruction_input: tuple[str, str] | None = None,
) -> dict[str, list[int]]:
    """Token ids of the full chat (or Alpaca text) and labels that are -100 on the prompt (loss on the
    answer only), cut to `max_length` tokens. `instruction_input` (`task_input(row)`): the Alpaca
    template renders it with its input variant; the chat template renders `prompt`, their joined text."""
    check_template(template)
    if template == "alpaca":
        full_ids, n_prompt = _alpaca(tokenizer, prompt, response, system_prompt, instruction_input)
    else:
        prompt_ids = _ids(tokenizer, messages(prompt, None, system_prompt), add_generation_prompt=True)
        full_ids = _ids(tokenizer, messages(prompt, response, system_prompt), add_generation_prompt=False)
        n_prompt = len(prompt_ids) if full_ids[: len(prompt_ids)] == prompt_ids else _common_prefix(prompt_ids,
                                                                                                    full_ids)
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


def encode_text(tokenizer, prompt: str, response: str, max_length: int = 512, template: str = "chat") -> list[int]:
    """A (prompt, response) pair as one chat with no system prompt (or one Alpaca text): Surgery's pool texts."""
    check_template(template)
    if template == "alpaca":
        return _alpaca(tokenizer, prompt, response, None)[0][:max_length]
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
