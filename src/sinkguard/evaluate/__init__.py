"""Evaluation: batched generation, harmful score, fine-tune accuracy, the harmfulness judge."""

from .generation import generate as generate
from .generation import read_generations as read_generations
from .generation import render_prompt as render_prompt
from .judge import Judge as Judge
from .judge import JudgeConfig as JudgeConfig
from .judge import evaluate_judge as evaluate_judge
from .judge import is_refusal as is_refusal
from .judge import load_judge as load_judge
from .judge import refusal_rate as refusal_rate
from .judge import train_judge as train_judge
from .metrics import accuracy as accuracy
from .metrics import extract_number as extract_number
from .metrics import finetune_accuracy as finetune_accuracy
from .metrics import harmful_score as harmful_score
from .metrics import is_correct as is_correct
from .metrics import label_correct as label_correct
