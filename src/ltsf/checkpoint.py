"""Load checkpoints saved by the official CycleNet / SegRNN code (`checkpoint.pth`) without pickle.

The official `checkpoint.pth` is a plain state dict, so `torch.load(..., weights_only=True)`
reads it. The sizes are read from the tensor shapes; what the shapes cannot tell (SegRNN's
`seq_len`, `use_revin`, ...) is passed as the official flag of the same name.

Phase convention. The official data loaders pass the cycle index of the first *target* row,
`(start + seq_len) mod W`, and the official model reads the input's cycle from it as if it were
the first input row; ltsf passes the first input row's index, `start mod W`. Both train
equivalently (the learned `Q` is the official one rotated by `seq_len`), but an official `Q`
used with ltsf's phase is wrong whenever `seq_len` is not a multiple of `W`. `load_checkpoint`
therefore rotates the loaded `Q` by `seq_len` rows, after which ltsf's convention reproduces the
official forecast exactly for every window.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .errors import LTSFError
from .train import _forward, build_model

#: Models whose official checkpoints can be read.
CHECKPOINT_MODELS = ("CycleNet", "SegRNN", "Linear", "DLinear")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` state dict, read with `weights_only=True` (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise LTSFError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals, truncated zips, foreign formats
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LTSFError(f"{path} is not a readable state-dict checkpoint ({first.split('. ')[0][:120]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise LTSFError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _infer_cyclenet(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    q = state["cycleQueue.data"]
    if "model.weight" in state:
        pred_len, seq_len = state["model.weight"].shape
        return {"model_type": "linear", "seq_len": seq_len, "pred_len": pred_len,
                "cycle": q.shape[0], "enc_in": q.shape[1]}
    d_model, seq_len = state["model.0.weight"].shape
    return {"model_type": "mlp", "seq_len": seq_len, "pred_len": state["model.2.weight"].shape[0],
            "d_model": d_model, "cycle": q.shape[0], "enc_in": q.shape[1]}


def _infer_segrnn(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    d_model, seg_len = state["valueEmbedding.0.weight"].shape
    gates = state["rnn.weight_ih_l0"].shape[0] // d_model
    out: dict[str, Any] = {"d_model": d_model, "seg_len": seg_len,
                           "rnn_type": {1: "rnn", 3: "gru", 4: "lstm"}[gates]}
    if "pos_emb" in state:
        out.update(dec_way="pmf", pred_len=state["pos_emb"].shape[0] * seg_len,
                   channel_id=int("channel_emb" in state))
        if "channel_emb" in state:
            out["enc_in"] = state["channel_emb"].shape[0]
    else:
        out["dec_way"] = "rmf"
    return out


def _infer_linear(state: dict[str, torch.Tensor], model: str) -> dict[str, Any]:
    key = "Linear.weight" if model == "Linear" else next(
        k for k in ("Linear_Seasonal.weight", "Linear_Seasonal.0.weight") if k in state)
    pred_len, seq_len = state[key].shape
    out: dict[str, Any] = {"seq_len": seq_len, "pred_len": pred_len}
    if model == "DLinear" and key.endswith(".0.weight"):
        out["individual"] = 1
        out["enc_in"] = sum(1 for k in state if k.startswith("Linear_Seasonal.") and k.endswith(".weight"))
    return out


class CheckpointForecaster:
    """A model loaded from an official checkpoint; forecasts one scaled window at a time."""

    def __init__(self, model: nn.Module, config: RunConfig, enc_in: int) -> None:
        self.model = model.eval()
        self.config = config
        self.enc_in = enc_in

    def predict_window(self, x: np.ndarray | torch.Tensor, start: int) -> np.ndarray:
        """Scaled forecast `(pred_len, C)` for the scaled window `x` `(seq_len, C)` whose first
        row is row `start` of the series (the same numbers the official code gives)."""
        cfg = self.config
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if t.ndim != 2 or t.shape != (cfg.seq_len, self.enc_in):
            raise LTSFError(f"predict_window expects x of shape (seq_len, channels) = "
                            f"({cfg.seq_len}, {self.enc_in}), got {tuple(t.shape)}")
        if int(start) < 0:
            raise LTSFError(f"start must be a row index >= 0, got {start}")
        phase = torch.tensor([int(start) % cfg.cycle])
        with torch.no_grad():
            y = _forward(self.model, t.unsqueeze(0), phase)
        return y[0].cpu().numpy()


def load_checkpoint(path: str | os.PathLike, model: str = "CycleNet", **official_flags: Any) -> CheckpointForecaster:
    """Load an official `checkpoint.pth` of `model`; sizes come from the tensors, the rest from
    `official_flags` (official flag names: `seq_len` for SegRNN, `use_revin`, `enc_in`, ...)."""
    if model not in CHECKPOINT_MODELS:
        raise LTSFError(f"cannot load official {model!r} checkpoints; use one of {', '.join(CHECKPOINT_MODELS)}")
    state = read_state_dict(path)
    try:
        inferred = {"CycleNet": _infer_cyclenet, "SegRNN": _infer_segrnn}.get(
            model, lambda s: _infer_linear(s, model))(state)
    except (KeyError, StopIteration) as exc:
        raise LTSFError(f"{path} does not look like an official {model} checkpoint "
                        f"(missing {exc}); pass the right model=") from None
    for key, value in official_flags.items():
        if key in inferred and inferred[key] != value:
            raise LTSFError(f"{key}={value!r} contradicts the checkpoint, which has {key}={inferred[key]!r}")
    values = {"model": model, "data": "custom", "data_path": "checkpoint", **inferred, **official_flags}
    if model == "SegRNN" and "seq_len" not in values:
        raise LTSFError("a SegRNN checkpoint does not record its look-back; pass seq_len=<the "
                        "--seq_len it was trained with>")
    if model == "SegRNN" and "pred_len" not in values:
        raise LTSFError("an RMF SegRNN checkpoint does not record its horizon; pass pred_len=...")
    if "enc_in" not in values:
        raise LTSFError(f"this {model} checkpoint does not record its channel count; pass enc_in=...")
    values.setdefault("cycle", 24)
    cfg = RunConfig.from_dict(values).validate()
    enc_in = int(values["enc_in"])
    net = build_model(cfg, enc_in)
    if model == "CycleNet":
        state = {**state, "cycleQueue.data": torch.roll(state["cycleQueue.data"], -cfg.seq_len, dims=0)}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise LTSFError(f"{path} does not match a {model} with {inferred}: "
                        f"{str(exc).splitlines()[0]}") from None
    return CheckpointForecaster(net, cfg, enc_in)
