"""Evaluation: batched generation, harmful score, fine-tune accuracy, the harmfulness judge.

The public names load on first use (PEP 562), so importing a submodule such as `judge_data`
for its constants (the CLI does, to list choices) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generation": ("generate", "read_generations", "render_prompt"),
    "judge": ("Judge", "JudgeConfig", "evaluate_judge", "is_refusal", "load_judge", "refusal_rate", "train_judge"),
    "metrics": ("accuracy", "extract_number", "finetune_accuracy", "harmful_score", "is_correct", "label_correct"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
