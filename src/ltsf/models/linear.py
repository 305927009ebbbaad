"""The Linear and MLP baselines: one map along time shared by all channels, optional instance norm.

`Linear` without normalisation is the official `models/Linear.py`; with `use_revin` it is
`RLinear`, and `MLP` with `use_revin` is `RMLP` (CycleNet repository): CycleNet/Linear and
CycleNet/MLP without the learned cycle, the baselines of the RCF ablation.
"""

from __future__ import annotations

import torch
from torch import nn

from .cyclenet import instance_norm


class Linear(nn.Module):
    """`x` `(B, seq_len, C)` -> `(B, pred_len, C)` by one linear map along time."""

    needs_phase = False

    def __init__(self, seq_len: int, pred_len: int, use_revin: bool = False) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.use_revin = use_revin
        # Attribute name as in the official model, so state-dict keys match (`Linear.weight`).
        self.Linear = nn.Linear(seq_len, pred_len)

    def forward(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_revin:
            x, mean, std = instance_norm(x)
        y = self.Linear(x.transpose(1, 2)).transpose(1, 2)
        return y * std + mean if self.use_revin else y


class MLP(nn.Module):
    """`seq_len -> d_model -> ReLU -> pred_len` along time, shared by channels (official RMLP)."""

    needs_phase = False

    def __init__(self, seq_len: int, pred_len: int, d_model: int = 512, use_revin: bool = False) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.use_revin = use_revin
        self.MLP = nn.Sequential(nn.Linear(seq_len, d_model), nn.ReLU(), nn.Linear(d_model, pred_len))

    def forward(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_revin:
            x, mean, std = instance_norm(x)
        y = self.MLP(x.transpose(1, 2)).transpose(1, 2)
        return y * std + mean if self.use_revin else y
