"""CycleNet: Residual Cycle Forecasting (RCF) with a Linear or MLP backbone (Lin et al., 2024)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LTSFError


def instance_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CycleNet's instance norm over time: window mean, unbiased variance + 1e-5, not detached.

    Returns the normalised `x` and the mean and std `(B, 1, C)` that undo it.
    """
    mean = x.mean(dim=1, keepdim=True)
    std = torch.sqrt(x.var(dim=1, keepdim=True) + 1e-5)
    return (x - mean) / std, mean, std


class RecurrentCycle(nn.Module):
    """Learnable cycles `Q` of shape `(W, C)`, zero-initialised, read cyclically from a phase.

    `forward(phase, length)` with `phase` `(B,)` returns `Q[(phase + k) mod W]` for
    `k = 0..length-1`, shape `(B, length, C)`.
    """

    def __init__(self, cycle_len: int, channels: int) -> None:
        super().__init__()
        self.cycle_len = cycle_len
        self.channels = channels
        # Named `data` so state-dict keys (`cycleQueue.data`) match the official checkpoints.
        self.data = nn.Parameter(torch.zeros(cycle_len, channels))

    def forward(self, phase: torch.Tensor, length: int) -> torch.Tensor:
        steps = torch.arange(length, device=phase.device)
        index = (phase.view(-1, 1).long() + steps.view(1, -1)) % self.cycle_len
        return self.data[index]


class CycleNet(nn.Module):
    """CycleNet for `x` `(B, seq_len, C)` and `phase` `(B,)` -> forecast `(B, pred_len, C)`.

    `phase` is the cycle index (row index mod `cycle`) of the first *input* row. Steps:
    optional instance normalisation (window mean, unbiased variance + 1e-5, not detached, as the
    official code), subtract `Q` read from `phase` for `seq_len` rows, channel-shared backbone
    along time (`linear`: `seq_len -> pred_len`; `mlp`: `seq_len -> d_model -> ReLU -> pred_len`),
    add `Q` read from `phase + seq_len` for `pred_len` rows, undo the normalisation.
    """

    needs_phase = True

    def __init__(self, seq_len: int, pred_len: int, enc_in: int, cycle: int,
                 model_type: str = "mlp", d_model: int = 512, use_revin: bool = True) -> None:
        super().__init__()
        if model_type not in ("linear", "mlp"):
            raise LTSFError(f"model_type must be 'linear' or 'mlp', got {model_type!r}")
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.enc_in = enc_in
        self.cycle_len = cycle
        self.model_type = model_type
        self.use_revin = use_revin
        self.cycleQueue = RecurrentCycle(cycle, enc_in)
        if model_type == "linear":
            self.model: nn.Module = nn.Linear(seq_len, pred_len)
        else:
            self.model = nn.Sequential(nn.Linear(seq_len, d_model), nn.ReLU(),
                                       nn.Linear(d_model, pred_len))

    def forward(self, x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        if self.use_revin:
            x, mean, std = instance_norm(x)
        x = x - self.cycleQueue(phase, self.seq_len)
        y = self.model(x.transpose(1, 2)).transpose(1, 2)
        y = y + self.cycleQueue((phase + self.seq_len) % self.cycle_len, self.pred_len)
        if self.use_revin:
            y = y * std + mean
        return y
