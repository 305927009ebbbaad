"""Data: named sources, the papers' mixtures, chat formatting."""

from .formatting import IGNORE_INDEX, PadCollator, encode_example, encode_text, messages
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
    "ATTACKS", "IGNORE_INDEX", "TASKS", "PadCollator", "alignment_dataset", "attack_rows",
    "benign_eval_prompts", "data_root", "dropped_training_rows", "defense_harmful_set", "encode_example", "encode_text", "harmful_eval_prompts",
    "load_source", "messages", "poisoned_dataset", "reference_pools",
]
