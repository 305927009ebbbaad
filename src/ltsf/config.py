"""Run configuration: one dataclass whose field names are the official scripts' flag names."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .data import DATASET_DEFAULTS, DATASET_KINDS, DEFAULT_BATCH_SIZE, DEFAULT_FILES, FEATURES
from .errors import LTSFError
from .models import MODELS

LRADJ = ("type1", "type2", "type3", "constant", "3", "4", "5", "6", "TST")
LOSSES = ("mse", "mae")

#: Fields that change how a run is executed but not its result; a rerun may change them freely.
RUNTIME_FIELDS = ("checkpoints", "num_threads", "device")

#: Fields shown in the run folder name (`setting`); `ltsf grid` tags a swept field not listed here.
NAMED_FIELDS = ("data", "data_path", "seq_len", "pred_len", "model", "model_type", "cycle",
                "rnn_type", "dec_way", "seg_len", "features", "random_seed", "rcf", "use_revin",
                "individual", "tag")

_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


@dataclass
class RunConfig:
    """Everything that defines one run; defaults are the official argument parsers' defaults.

    Fields left `None` take the model's or the dataset's own default: `use_revin` (CycleNet 1,
    others 0), `dropout` (SegRNN 0.5), `enc_in` (the channels in the data), `rcf` (CycleNet is
    RCF by construction; other models 0), `cycle` and `batch_size` (per dataset, as the
    official scripts: `ltsf.data.DATASET_DEFAULTS`). `validate()` fills `cycle`/`batch_size`.
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
    cycle: int | None = None
    model_type: str = "mlp"
    use_revin: int | None = None
    seg_len: int = 48
    d_model: int = 512
    dropout: float | None = None
    rnn_type: str = "gru"
    dec_way: str = "pmf"
    channel_id: int = 1
    individual: int = 0
    train_epochs: int = 30
    patience: int = 5
    batch_size: int | None = None
    learning_rate: float = 1e-4
    lradj: str = "type3"
    pct_start: float = 0.3
    loss: str = "mse"
    random_seed: int = 2024
    # Our additions (not official flags); defaults reproduce the official behaviour.
    rcf: int | None = None
    cyclenet_loss_flag: int = 0
    tag: str = ""
    checkpoints: str = "runs/ltsf"
    onecycle_init: int = 1
    test_each_epoch: int = 1
    num_threads: int = 0
    device: str = "auto"

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            optional = f.type.endswith("| None")
            if value is None and optional:
                continue
            allowed = _TYPES[f.type.split(" ")[0]]
            if isinstance(value, bool) or not isinstance(value, allowed):
                kind = {"int": "an integer", "float": "a number", "str": "a string"}[f.type.split(" ")[0]]
                raise LTSFError(f"--{f.name} must be {kind}, got {value!r} ({type(value).__name__})")

    @property
    def stem(self) -> str:
        """Dataset name used for per-dataset defaults and the run name (file stem or `--data`)."""
        return Path(self.data_path).stem if self.data_path else self.data

    @property
    def uses_cycle(self) -> bool:
        """Whether the model reads the cycle phase (CycleNet, or any model with `--rcf 1`)."""
        return self.model == "CycleNet" or bool(self.rcf)

    def validate(self) -> RunConfig:
        """Check types, choices and ranges, fill per-dataset defaults; raise `LTSFError` naming the fix."""
        self._check_types()
        choices = {"model": MODELS, "features": FEATURES, "model_type": ("linear", "mlp"),
                   "rnn_type": ("rnn", "gru", "lstm"), "dec_way": ("pmf", "rmf"),
                   "lradj": LRADJ, "loss": LOSSES, "data": tuple(DATASET_KINDS)}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise LTSFError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")
        for name in ("use_revin", "rcf", "channel_id", "individual", "onecycle_init",
                     "test_each_epoch", "cyclenet_loss_flag"):
            if getattr(self, name) not in (None, 0, 1):
                raise LTSFError(f"--{name} must be 0 or 1, got {getattr(self, name)!r}")
        if self.data_path is None and self.data not in DEFAULT_FILES:
            raise LTSFError(f"--data {self.data} needs --data_path (the CSV file name under the data root)")
        defaults = DATASET_DEFAULTS.get(self.stem, DATASET_DEFAULTS.get(self.data, {}))
        if self.cycle is None:
            if self.uses_cycle and "cycle" not in defaults:
                raise LTSFError(f"no default cycle length for {self.stem!r}; pass --cycle (steps "
                                "per period, e.g. 24 for hourly data with a daily cycle)")
            self.cycle = defaults.get("cycle", 24)
        if self.batch_size is None:
            self.batch_size = defaults.get("batch_size", DEFAULT_BATCH_SIZE)
        for name in ("seq_len", "pred_len", "cycle", "seg_len", "d_model", "batch_size",
                     "train_epochs", "patience"):
            if getattr(self, name) <= 0:
                raise LTSFError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.enc_in is not None and self.enc_in <= 0:
            raise LTSFError(f"--enc_in must be a positive integer, got {self.enc_in}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise LTSFError(f"--learning_rate must be a positive finite number, got {self.learning_rate}")
        if not (math.isfinite(self.pct_start) and 0.0 < self.pct_start < 1.0):
            raise LTSFError(f"--pct_start must be strictly between 0 and 1 (OneCycleLR's warm-up "
                            f"fraction), got {self.pct_start}")
        if self.num_threads < 0:
            raise LTSFError(f"--num_threads must be >= 0 (0: torch default), got {self.num_threads}")
        if self.model == "SegRNN" and (self.seq_len % self.seg_len or self.pred_len % self.seg_len):
            raise LTSFError(f"SegRNN needs --seg_len ({self.seg_len}) to divide --seq_len "
                            f"({self.seq_len}) and --pred_len ({self.pred_len})")
        if (self.model == "SegRNN" and self.dec_way == "pmf" and self.channel_id
                and self.d_model % 2):
            raise LTSFError(f"SegRNN with --dec_way pmf --channel_id 1 splits --d_model into "
                            f"position and channel halves, so it must be even; got {self.d_model}")
        if self.dropout is not None and not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise LTSFError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.model == "CycleNet" and self.rcf == 0:
            raise LTSFError("CycleNet is RCF around a Linear/MLP backbone and cannot drop it; for "
                            "the backbone alone use --model Linear or MLP with --use_revin 1")
        if "/" in self.tag or self.tag.startswith("."):
            raise LTSFError(f"--tag {self.tag!r} must not contain '/' or start with '.'")
        return self

    @property
    def revin(self) -> bool:
        """Effective normalisation switch (CycleNet defaults on, the other models off)."""
        if self.use_revin is None:
            return self.model == "CycleNet"
        return bool(self.use_revin)

    @property
    def effective_dropout(self) -> float:
        """Dropout used by SegRNN's output head (official default 0.5)."""
        return 0.5 if self.dropout is None else float(self.dropout)

    @property
    def effective_loss(self) -> str:
        """Training loss: the official CycleNet code always uses MSE; the others follow `--loss`."""
        if self.model == "CycleNet" and not self.cyclenet_loss_flag:
            return "mse"
        return self.loss

    @property
    def setting(self) -> str:
        """Run name in the spirit of the official `setting` string."""
        arch = {"CycleNet": f"{self.model_type}_cycle{self.cycle}",
                "SegRNN": f"{self.rnn_type}_{self.dec_way}_seg{self.seg_len}",
                "DLinear": "ind" if self.individual else ""}.get(self.model, "")
        if self.model in ("Linear", "MLP", "DLinear") and self.revin:
            arch = f"{arch}_revin".lstrip("_")
        if self.rcf and self.model != "CycleNet":
            arch = f"{arch}_rcf{self.cycle}".lstrip("_")
        tag = f"_{arch}" if arch else ""
        extra = f"_{self.tag}" if self.tag else ""
        return (f"{self.stem}_{self.seq_len}_{self.pred_len}_{self.model}{tag}_ft{self.features}"
                f"_seed{self.random_seed}{extra}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a dict, rejecting unknown keys with a clear error."""
        if not isinstance(d, dict):
            raise LTSFError(f"a run configuration must be a mapping of flag names to values, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LTSFError(f"unknown config key(s): {', '.join(unknown)}; valid keys are the "
                            "`ltsf train` flag names")
        return cls(**d)
