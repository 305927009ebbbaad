"""Forecasting models, all `(B, seq_len, C) -> (B, pred_len, C)`: CycleNet, SegRNN, DLinear,
Linear, MLP, and the RCF plug-in that wraps any of them."""

from .cyclenet import CycleNet, RecurrentCycle
from .dlinear import DLinear
from .linear import MLP, Linear
from .rcf import RCF
from .segrnn import SegRNN

MODELS = ("CycleNet", "SegRNN", "Linear", "MLP", "DLinear")

__all__ = ["MLP", "MODELS", "RCF", "CycleNet", "DLinear", "Linear", "RecurrentCycle", "SegRNN"]
