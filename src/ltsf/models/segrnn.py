"""SegRNN: segment-wise RNN encoder with parallel (PMF) or recurrent (RMF) decoding (Lin et al., 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LTSFError

RNN_TYPES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RevIN(nn.Module):
    """Instance normalisation without affine parameters; statistics detached (official RevIN)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std over time of `x` `(B, T, C)`, each `(B, 1, C)`, population variance."""
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        return mean, std


class SegRNN(nn.Module):
    """SegRNN for `x` `(B, seq_len, C)` -> forecast `(B, pred_len, C)`; channels independent.

    Normalise (subtract the last input value per channel, or RevIN), reshape to
    `(B*C, N, seg_len)` with `N = seq_len / seg_len`, embed each segment with
    `Linear(seg_len, d_model) + ReLU`, run a one-layer RNN/GRU/LSTM and keep the final state `h`
    `(1, B*C, d)`. PMF: `M = pred_len / seg_len` segments decoded in parallel, each by one RNN
    step from `h` whose input is [position embedding (M, d/2) | channel embedding (C, d/2)]
    (`channel_id`; else a position embedding (M, d)); RMF: the predicted segment is re-embedded
    and fed back. Each decoded state goes through `Dropout + Linear(d, seg_len)`.

    `factorized_pmf` (default) computes the PMF step without materialising the `B*C*M` repeated
    inputs and states: the input projection is taken once per (channel, position) and the state
    projection once per (sample, channel), then broadcast. It is the same function as one
    `nn.GRU`/`RNN`/`LSTM` step over the repeated tensors (same weights, same gate equations),
    about `M` times cheaper; `factorized_pmf=False` runs the literal repeated RNN call.
    """

    needs_phase = False

    def __init__(self, seq_len: int, pred_len: int, enc_in: int, seg_len: int = 48,
                 d_model: int = 512, dropout: float = 0.5, rnn_type: str = "gru",
                 dec_way: str = "pmf", channel_id: bool = True, revin: bool = False,
                 factorized_pmf: bool = True) -> None:
        super().__init__()
        if rnn_type not in RNN_TYPES:
            raise LTSFError(f"rnn_type must be one of {sorted(RNN_TYPES)}, got {rnn_type!r}")
        if dec_way not in ("pmf", "rmf"):
            raise LTSFError(f"dec_way must be 'pmf' or 'rmf', got {dec_way!r}")
        if seq_len % seg_len or pred_len % seg_len:
            raise LTSFError(f"seg_len {seg_len} must divide seq_len {seq_len} and pred_len {pred_len}")
        if channel_id and dec_way == "pmf" and d_model % 2:
            raise LTSFError(f"d_model must be even with channel_id, got {d_model}")
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.enc_in = enc_in
        self.seg_len = seg_len
        self.d_model = d_model
        self.rnn_type = rnn_type
        self.dec_way = dec_way
        self.channel_id = channel_id
        self.revin = revin
        self.factorized_pmf = factorized_pmf
        self.seg_num_x = seq_len // seg_len
        self.seg_num_y = pred_len // seg_len
        # Creation order and attribute names follow the official model so that a given seed gives
        # the same initial weights and the state-dict keys match.
        self.valueEmbedding = nn.Sequential(nn.Linear(seg_len, d_model), nn.ReLU())
        self.rnn = RNN_TYPES[rnn_type](input_size=d_model, hidden_size=d_model, num_layers=1,
                                       bias=True, batch_first=True, bidirectional=False)
        if dec_way == "pmf":
            if channel_id:
                self.pos_emb = nn.Parameter(torch.randn(self.seg_num_y, d_model // 2))
                self.channel_emb = nn.Parameter(torch.randn(enc_in, d_model // 2))
            else:
                self.pos_emb = nn.Parameter(torch.randn(self.seg_num_y, d_model))
        self.predict = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, seg_len))
        self.revinLayer = RevIN() if revin else None

    def _pmf_inputs(self) -> torch.Tensor:
        """Decoder inputs per (channel, position), `(C, M, d)`."""
        m = self.seg_num_y
        if self.channel_id:
            return torch.cat([self.pos_emb.unsqueeze(0).expand(self.enc_in, -1, -1),
                              self.channel_emb.unsqueeze(1).expand(-1, m, -1)], dim=-1)
        return self.pos_emb.unsqueeze(0).expand(self.enc_in, -1, -1)

    def _pmf_factorized(self, state, b: int) -> torch.Tensor:
        """One RNN step for every (sample, channel, position) by broadcasting; returns `(B, C, pred_len)`."""
        c, d = self.enc_in, self.d_model
        rnn = self.rnn
        gi = F.linear(self._pmf_inputs(), rnn.weight_ih_l0, rnn.bias_ih_l0).unsqueeze(0)
        h = (state[0] if self.rnn_type == "lstm" else state).view(b, c, 1, d)
        gh = F.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0)
        if self.rnn_type == "gru":
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            hy = (1 - z) * n + z * h
        elif self.rnn_type == "rnn":
            hy = torch.tanh(gi + gh)
        else:
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            cell = torch.sigmoid(f) * state[1].view(b, c, 1, d) + torch.sigmoid(i) * torch.tanh(g)
            hy = torch.sigmoid(o) * torch.tanh(cell)
        return self.predict(hy).reshape(b, c, self.pred_len)

    def _step(self, inp: torch.Tensor, state):
        _, state = self.rnn(inp, state)
        return state

    def forward(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        if self.revinLayer is not None:
            mean, std = self.revinLayer.stats(x)
            x = (x - mean) / std
        else:
            last = x[:, -1:, :].detach()
            x = x - last
        seg = x.transpose(1, 2).reshape(-1, self.seg_num_x, self.seg_len)
        _, state = self.rnn(self.valueEmbedding(seg))
        lstm = self.rnn_type == "lstm"
        if self.dec_way == "rmf":
            outs = []
            for _ in range(self.seg_num_y):
                h = state[0] if lstm else state
                yy = self.predict(h).transpose(0, 1)
                outs.append(yy)
                state = self._step(self.valueEmbedding(yy), state)
            y = torch.stack(outs, dim=1).squeeze(2).reshape(-1, self.enc_in, self.pred_len)
        elif self.factorized_pmf:
            y = self._pmf_factorized(state, b)
        else:
            m, d = self.seg_num_y, self.d_model
            emb = self._pmf_inputs().reshape(1, -1, d).expand(b, -1, -1).reshape(-1, 1, d)

            def spread(s: torch.Tensor) -> torch.Tensor:
                return s.repeat(1, 1, m).view(1, -1, d)

            init = (spread(state[0]), spread(state[1])) if lstm else spread(state)
            hy = self._step(emb, init)
            hy = hy[0] if lstm else hy
            y = self.predict(hy).view(-1, self.enc_in, self.pred_len)
        y = y.transpose(1, 2)
        if self.revinLayer is not None:
            return y * std + mean
        return y + last
