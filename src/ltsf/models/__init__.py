"""Forecasting models: CycleNet, SegRNN and the Linear baseline, all `(B, seq_len, C) -> (B, pred_len, C)`."""

from .cyclenet import CycleNet, RecurrentCycle
from .linear import Linear
from .segrnn import SegRNN

MODELS = ("CycleNet", "SegRNN", "Linear")

__all__ = ["MODELS", "CycleNet", "Linear", "RecurrentCycle", "SegRNN"]
