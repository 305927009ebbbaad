"""The plain Linear baseline (one `seq_len -> pred_len` layer shared by all channels)."""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """`x` `(B, seq_len, C)` -> `(B, pred_len, C)` by one linear map along time, no normalisation."""

    needs_phase = False

    def __init__(self, seq_len: int, pred_len: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.pred_len = pred_len
        # Attribute name as in the official model, so state-dict keys match (`Linear.weight`).
        self.Linear = nn.Linear(seq_len, pred_len)

    def forward(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        return self.Linear(x.transpose(1, 2)).transpose(1, 2)
