"""Evaluation: batched generation, harmful score, fine-tune accuracy, the harmfulness judge."""

from .generation import generate as generate
from .generation import read_generations as read_generations
from .generation import render_prompt as render_prompt
from .metrics import accuracy as accuracy
from .metrics import extract_number as extract_number
from .metrics import finetune_accuracy as finetune_accuracy
from .metrics import harmful_score as harmful_score
from .metrics import is_correct as is_correct
from .metrics import label_correct as label_correct
