"""Residual Cycle Forecasting (RCF) as a plug-in around any `(B, L, C) -> (B, H, C)` backbone.

CycleNet's technique (Lin et al., 2024, Sec. 3): learn one cycle `Q` `(W, C)` per channel,
remove it from the input window, forecast the residual with the backbone and add the cycle
back for the horizon. CycleNet itself is RCF around a Linear or MLP backbone with instance
normalisation outside it; `RCF(backbone, ..., use_revin=True)` wrapping `Linear` computes the
same function as `CycleNet(model_type="linear")` (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from .cyclenet import RecurrentCycle, instance_norm


class RCF(nn.Module):
    """Wrap `backbone`: `x - Q[phase..]` -> backbone -> `+ Q[phase + seq_len..]`.

    `phase` is the cycle index of the first input row (ltsf's convention, see `CycleNet`).
    With `use_revin` the window is normalised first (CycleNet's instance norm) and the output
    de-normalised last, as CycleNet does; the backbone's own normalisation, if any, still runs.
    """

    needs_phase = True

    def __init__(self, backbone: nn.Module, seq_len: int, pred_len: int, enc_in: int, cycle: int,
                 use_revin: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.cycle_len = cycle
        self.use_revin = use_revin
        self.cycleQueue = RecurrentCycle(cycle, enc_in)

    def forward(self, x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        if self.use_revin:
            x, mean, std = instance_norm(x)
        x = x - self.cycleQueue(phase, self.seq_len)
        y = self.backbone(x)
        y = y + self.cycleQueue((phase + self.seq_len) % self.cycle_len, self.pred_len)
        if self.use_revin:
            y = y * std + mean
        return y
