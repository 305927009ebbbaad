"""Run configuration: one dataclass whose field names are the official scripts' flag names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .data import DATASET_KINDS, FEATURES
from .errors import LTSFError
from .models import MODELS

LRADJ = ("type1", "type2", "type3", "constant", "3", "4", "5", "6", "TST")
LOSSES = ("mse", "mae")


@dataclass
class RunConfig:
    """Everything that defines one run; defaults are the official argument parsers' defaults.

    Fields left `None` take the model's own default: `use_revin` (CycleNet 1, SegRNN 0),
    `dropout` (SegRNN 0.5), `enc_in` (the number of channels in the data).
    """

    model: str = "CycleNet"
    data: str = "ETTh1"
    root_path: str | None = None
    data_path: str | None = None
    features: str = "M"
    target: str = "OT"
    seq_len: int = 96
    pred_len: int = 96
    enc_in: int | None = None
    cycle: int = 24
    model_type: str = "mlp"
    use_revin: int | None = None
    seg_len: int = 48
    d_model: int = 512
    dropout: float | None = None
    rnn_type: str = "gru"
    dec_way: str = "pmf"
    channel_id: int = 1
    train_epochs: int = 30
    patience: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-4
    lradj: str = "type3"
    pct_start: float = 0.3
    loss: str = "mse"
    random_seed: int = 2024
    # Our additions (not official flags); defaults reproduce the official behaviour.
    checkpoints: str = "runs/ltsf"
    onecycle_init: int = 1
    test_each_epoch: int = 1
    num_threads: int = 0
    device: str = "auto"

    def validate(self) -> RunConfig:
        """Check choices and sizes; raise `LTSFError` naming the bad value and the fix."""
        choices = {"model": MODELS, "features": FEATURES, "model_type": ("linear", "mlp"),
                   "rnn_type": ("rnn", "gru", "lstm"), "dec_way": ("pmf", "rmf"),
                   "lradj": LRADJ, "loss": LOSSES, "data": tuple(DATASET_KINDS)}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise LTSFError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")
        for name in ("seq_len", "pred_len", "cycle", "seg_len", "d_model", "batch_size",
                     "train_epochs", "patience"):
            if getattr(self, name) <= 0:
                raise LTSFError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise LTSFError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.model == "SegRNN" and (self.seq_len % self.seg_len or self.pred_len % self.seg_len):
            raise LTSFError(f"SegRNN needs --seg_len ({self.seg_len}) to divide --seq_len "
                            f"({self.seq_len}) and --pred_len ({self.pred_len})")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise LTSFError(f"--dropout must be in [0, 1), got {self.dropout}")
        return self

    @property
    def revin(self) -> bool:
        """Effective normalisation switch (CycleNet defaults on, SegRNN off)."""
        if self.use_revin is None:
            return self.model == "CycleNet"
        return bool(self.use_revin)

    @property
    def effective_dropout(self) -> float:
        """Dropout used by SegRNN's output head (official default 0.5)."""
        return 0.5 if self.dropout is None else float(self.dropout)

    @property
    def setting(self) -> str:
        """Run name in the spirit of the official `setting` string."""
        name = Path(self.data_path).stem if self.data_path else self.data
        arch = {"CycleNet": f"{self.model_type}_cycle{self.cycle}",
                "SegRNN": f"{self.rnn_type}_{self.dec_way}_seg{self.seg_len}"}.get(self.model, "")
        tag = f"_{arch}" if arch else ""
        return (f"{name}_{self.seq_len}_{self.pred_len}_{self.model}{tag}_ft{self.features}"
                f"_seed{self.random_seed}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a dict, rejecting unknown keys with a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LTSFError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**d)
