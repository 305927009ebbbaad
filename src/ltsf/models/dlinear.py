"""DLinear (Zeng et al., 2023): moving-average trend + remainder, one linear map along time each.

Faithful to the official `models/DLinear.py` (kernel 25, ends padded by repeating the first and
last rows, `individual` = one pair of layers per channel); state-dict keys match it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LTSFError


class MovingAverage(nn.Module):
    """Centred moving average along time with edge replication; `(B, L, C) -> (B, L, C)`."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.avg = nn.AvgPool1d(kernel_size=kernel_size, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel_size - 1) // 2
        front = x[:, :1, :].repeat(1, pad, 1)
        end = x[:, -1:, :].repeat(1, pad, 1)
        x = torch.cat([front, x, end], dim=1)
        return self.avg(x.transpose(1, 2)).transpose(1, 2)


class SeriesDecomp(nn.Module):
    """Split `x` into (remainder, trend) with a moving average."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.moving_avg = MovingAverage(kernel_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trend = self.moving_avg(x)
        return x - trend, trend


class DLinear(nn.Module):
    """DLinear for `x` `(B, seq_len, C)` -> `(B, pred_len, C)`, no normalisation (official)."""

    needs_phase = False

    def __init__(self, seq_len: int, pred_len: int, enc_in: int, individual: bool = False,
                 kernel_size: int = 25) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise LTSFError(f"DLinear's moving-average kernel must be odd and positive, got {kernel_size}")
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.channels = enc_in
        self.individual = individual
        self.decompsition = SeriesDecomp(kernel_size)  # official attribute name (sic)
        if individual:
            self.Linear_Seasonal = nn.ModuleList()
            self.Linear_Trend = nn.ModuleList()
            for _ in range(enc_in):  # creation order as the official loop: seasonal, trend, ...
                self.Linear_Seasonal.append(nn.Linear(seq_len, pred_len))
                self.Linear_Trend.append(nn.Linear(seq_len, pred_len))
        else:
            self.Linear_Seasonal = nn.Linear(seq_len, pred_len)
            self.Linear_Trend = nn.Linear(seq_len, pred_len)

    def forward(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        seasonal, trend = self.decompsition(x)
        seasonal, trend = seasonal.transpose(1, 2), trend.transpose(1, 2)
        if self.individual:
            out = torch.stack([self.Linear_Seasonal[i](seasonal[:, i]) + self.Linear_Trend[i](trend[:, i])
                               for i in range(self.channels)], dim=1)
        else:
            out = self.Linear_Seasonal(seasonal) + self.Linear_Trend(trend)
        return out.transpose(1, 2)
