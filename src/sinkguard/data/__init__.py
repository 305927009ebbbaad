"""Data: named sources, the papers' mixtures, chat formatting."""

from .formatting import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    PadCollator,
    encode_example,
    encode_text,
    messages,
    task_input,
)
from .mixing import (
    ATTACKS,
    TASKS,
    alignment_dataset,
    attack_rows,
    benign_eval_prompts,
    defense_harmful_set,
    harmful_eval_prompts,
    poisoned_dataset,
    reference_pools,
)
from .sources import data_root, dropped_training_rows, load_source

__all__ = [
    "ATTACKS", "DEFAULT_SYSTEM_PROMPT", "IGNORE_INDEX", "TASKS", "PadCollator", "alignment_dataset", "attack_rows",
    "benign_eval_prompts", "data_root", "defense_harmful_set", "dropped_training_rows", "encode_example",
    "encode_text", "harmful_eval_prompts",
    "load_source", "messages", "poisoned_dataset", "reference_pools", "task_input",
]
