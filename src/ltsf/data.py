"""Benchmark and user data: reading, the standard splits, train-fitted scaling, sliding windows.

The protocol follows the usual LTSF loaders (restated in `docs/ltsf.md`): ETT hourly files split
12/4/4 months, ETT 15-minute files the same times 4, other CSVs 70 % / rest / 20 %; each val/test
part starts `seq_len` rows before its border; the scaler is fitted on the training rows only.
Every window also carries its cycle phase (the row index of its first input row modulo the cycle
length) for CycleNet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import LTSFError

HOURS_PER_MONTH = 30 * 24

#: `--data` value -> how the file is split and read (as in the official data factories).
DATASET_KINDS: dict[str, str] = {
    "ETTh1": "ETTh",
    "ETTh2": "ETTh",
    "ETTm1": "ETTm",
    "ETTm2": "ETTm",
    "custom": "custom",
    "Solar": "Solar",
}

#: File read when `--data_path` is not given.
DEFAULT_FILES: dict[str, str] = {
    "ETTh1": "ETTh1.csv",
    "ETTh2": "ETTh2.csv",
    "ETTm1": "ETTm1.csv",
    "ETTm2": "ETTm2.csv",
    "Solar": "solar_AL.txt",
}

#: Per-dataset defaults of the official CycleNet scripts, keyed by file stem: the cycle length W
#: (ETT hourly 24, ETT 15-min 96, Weather / Solar 144 = one day, Electricity / Traffic 168 = one
#: week) and the batch size. `--cycle` / `--batch_size` left unset take these.
DATASET_DEFAULTS: dict[str, dict[str, int]] = {
    "ETTh1": {"cycle": 24, "batch_size": 256}, "ETTh2": {"cycle": 24, "batch_size": 256},
    "ETTm1": {"cycle": 96, "batch_size": 256}, "ETTm2": {"cycle": 96, "batch_size": 256},
    "weather": {"cycle": 144, "batch_size": 256}, "solar_AL": {"cycle": 144, "batch_size": 64},
    "electricity": {"cycle": 168, "batch_size": 64}, "traffic": {"cycle": 168, "batch_size": 64},
}

#: Batch size for data without a `DATASET_DEFAULTS` entry (the official `run.py` default).
DEFAULT_BATCH_SIZE = 128

FEATURES = ("M", "S", "MS")


def repo_root() -> Path:
    """The checkout holding this package (src/ltsf/data.py -> two levels up from src)."""
    return Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """`LTSF_DATA` if set, else `../shared/data/ltsf` beside the repository if it exists, else ./dataset."""
    env = os.environ.get("LTSF_DATA")
    if env:
        return Path(env).expanduser()
    shared = repo_root().parent / "shared" / "data" / "ltsf"
    if shared.is_dir():
        return shared
    return Path("dataset")


def resolve_data_file(data: str, data_path: str | None, root: str | os.PathLike | None) -> Path:
    """Path of the file for `--data`/`--data_path` under the data root; clear error if absent."""
    if data not in DATASET_KINDS:
        raise LTSFError(f"unknown --data {data!r}; use one of {', '.join(DATASET_KINDS)} "
                        "(custom = any CSV with a 'date' column, given by --data_path)")
    if data_path is None:
        if data not in DEFAULT_FILES:
            raise LTSFError(f"--data {data} needs --data_path (the CSV file name under the data root)")
        data_path = DEFAULT_FILES[data]
    path = Path(data_path).expanduser()
    if not path.is_absolute():
        path = Path(root).expanduser() / path if root is not None else default_data_root() / path
    if not path.is_file():
        raise LTSFError(f"data file {path} not found; set --root_path/--data-root or LTSF_DATA "
                        "to the folder holding it")
    return path


@dataclass
class StandardScaler:
    """Per-channel standard scaling fitted on training rows (population std, as scikit-learn)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> StandardScaler:
        """Fit on `values` (T, C); a constant channel gets scale 1 so it maps to zeros."""
        mean = values.mean(axis=0)
        std = values.std(axis=0)
        std = np.where(std == 0.0, 1.0, std)
        return cls(mean=mean.astype(np.float64), scale=std.astype(np.float64))

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scale `(..., C)` values."""
        return (values - self.mean) / self.scale

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        """Undo `transform` on `(..., C)` values."""
        return values * self.scale + self.mean

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form."""
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[float]]) -> StandardScaler:
        """Inverse of `to_dict`."""
        return cls(mean=np.asarray(d["mean"], dtype=np.float64),
                   scale=np.asarray(d["scale"], dtype=np.float64))


def cycle_phase(rows: np.ndarray | torch.Tensor | int, cycle: int) -> np.ndarray | torch.Tensor | int:
    """Cycle phase of absolute row indices: `row mod cycle` (the convention used everywhere here)."""
    return rows % cycle


class WindowDataset(Dataset):
    """Sliding windows over one split part.

    Item `i`: input rows `[i, i+seq_len)` (B-less shape `(seq_len, C)`), target rows
    `[i+seq_len, i+seq_len+pred_len)` (`(pred_len, C)`) and the phase
    `(offset + i) mod cycle` of the first input row, where `offset` is the part's first row in
    the whole file. Batched access (`__getitems__`) gathers a whole batch with one index op.
    """

    def __init__(self, values: np.ndarray, seq_len: int, pred_len: int, offset: int = 0,
                 cycle: int | None = None, name: str = "part") -> None:
        if values.ndim != 2:
            raise LTSFError(f"{name}: expected a (time, channels) array, got shape {values.shape}")
        self.data = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.offset = offset
        self.cycle = cycle
        self.name = name
        if self.data.shape[0] - seq_len - pred_len + 1 <= 0:
            raise LTSFError(f"the {name} part has {len(values)} rows, fewer than seq_len + pred_len "
                            f"= {seq_len + pred_len}; use shorter --seq_len/--pred_len or more data")
        self._in = torch.arange(seq_len)
        self._out = torch.arange(seq_len, seq_len + pred_len)

    def __len__(self) -> int:
        return self.data.shape[0] - self.seq_len - self.pred_len + 1

    def phase(self, index: torch.Tensor) -> torch.Tensor:
        """Phases of the first input rows of windows `index` (zeros when no cycle is set)."""
        if self.cycle is None:
            return torch.zeros_like(index)
        return (index + self.offset) % self.cycle

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, p = self.__getitems__([i])
        return x[0], y[0], p[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.data[idx[:, None] + self._in]
        y = self.data[idx[:, None] + self._out]
        return x, y, self.phase(idx)


def collate_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate for `WindowDataset.__getitems__`: the batch is already stacked."""
    return batch


@dataclass
class SeriesData:
    """A whole multichannel series: values (T, C), channel names, optional timestamps."""

    values: np.ndarray
    columns: list[str]
    dates: np.ndarray | None = None


@dataclass
class ForecastData:
    """The three scaled split parts as window datasets plus what is needed to undo the scaling."""

    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    scaler: StandardScaler
    columns: list[str]
    borders: dict[str, tuple[int, int]]
    target_only: bool = False
    info: dict[str, object] = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        """Number of input channels C."""
        return len(self.columns)


def split_borders(kind: str, n_rows: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """Row ranges `[b1, b2)` of train/val/test; val/test reach `seq_len` rows back."""
    if kind in ("ETTh", "ETTm"):
        per = HOURS_PER_MONTH * (4 if kind == "ETTm" else 1)
        n_train, n_val, n_test = 12 * per, 4 * per, 4 * per
        if n_rows < n_train + n_val + n_test:
            raise LTSFError(f"an {kind} file needs at least {n_train + n_val + n_test} rows for the "
                            f"12/4/4-month split, this one has {n_rows}")
        b1 = [0, n_train - seq_len, n_train + n_val - seq_len]
        b2 = [n_train, n_train + n_val, n_train + n_val + n_test]
    elif kind == "custom":
        n_train = int(n_rows * 0.7)
        n_test = int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        b1 = [0, n_train - seq_len, n_rows - n_test - seq_len]
        b2 = [n_train, n_train + n_val, n_rows]
    elif kind == "Solar":
        n_train = int(n_rows * 0.7)
        n_test = int(n_rows * 0.2)
        n_val = int(n_rows * 0.1)
        b1 = [0, n_train - seq_len, n_rows - n_test - seq_len]
        b2 = [n_train, n_train + n_val, n_rows]
    else:
        raise LTSFError(f"unknown split kind {kind!r}")
    if min(b1) < 0:
        raise LTSFError(f"seq_len {seq_len} reaches before the start of the file "
                        f"({n_rows} rows); use a shorter --seq_len")
    return {name: (b1[i], b2[i]) for i, name in enumerate(("train", "val", "test"))}


def read_series(path: str | os.PathLike, kind: str = "custom", features: str = "M",
                target: str = "OT") -> SeriesData:
    """Read a benchmark file as the official loaders do (custom: target moved to the last column)."""
    import pandas as pd

    path = Path(path)
    if features not in FEATURES:
        raise LTSFError(f"unknown --features {features!r}; use M, S or MS")
    if kind == "Solar":
        try:
            values = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise LTSFError(f"{path}: not a comma-separated numeric table ({exc})") from None
        columns = [str(i) for i in range(values.shape[1])]
        if features == "S":
            raise LTSFError("the Solar file has no named target column; use --features M")
        return SeriesData(values=values, columns=columns, dates=None)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise LTSFError(f"{path}: cannot be read as CSV ({exc})") from None
    if "date" not in df.columns:
        raise LTSFError(f"{path}: no 'date' column (columns: {', '.join(map(str, df.columns[:8]))}); "
                        "the benchmark loaders need the timestamp column named 'date'")
    if features in ("S", "MS") or kind == "custom":
        if target not in df.columns:
            raise LTSFError(f"{path}: target column {target!r} not found; pass --target NAME")
    if kind == "custom":
        cols = [c for c in df.columns if c not in ("date", target)]
        df = df[["date", *cols, target]]
    data_cols = [target] if features == "S" else [c for c in df.columns if c != "date"]
    return _frame_to_series(df, "date", data_cols, str(path))


def _frame_to_series(df, date_col: str | None, data_cols: list[str], where: str) -> SeriesData:
    """Numeric channels and parsed timestamps of a DataFrame, with one clear error when not numeric."""
    import pandas as pd

    block = df[data_cols]
    bad = [c for c in data_cols if not pd.api.types.is_numeric_dtype(block[c])]
    if bad:
        raise LTSFError(f"{where}: column(s) {', '.join(map(str, bad[:5]))} are not numeric; "
                        "drop them or convert them to numbers")
    values = block.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise LTSFError(f"{where}: {n_bad} missing or infinite value(s); fill or drop them first")
    dates = None
    if date_col is not None:
        try:
            dates = pd.to_datetime(df[date_col]).to_numpy()
        except (ValueError, TypeError) as exc:
            raise LTSFError(f"{where}: column {date_col!r} cannot be parsed as dates ({exc})") from None
    return SeriesData(values=values, columns=[str(c) for c in data_cols], dates=dates)


def make_splits(series: SeriesData, kind: str, seq_len: int, pred_len: int,
                cycle: int | None = None, features: str = "M") -> ForecastData:
    """Scale with train statistics, cut the three parts, and wrap them as window datasets."""
    if seq_len <= 0 or pred_len <= 0:
        raise LTSFError(f"seq_len and pred_len must be positive, got {seq_len} and {pred_len}")
    if cycle is not None and cycle <= 0:
        raise LTSFError(f"--cycle must be positive, got {cycle}")
    borders = split_borders(kind, len(series.values), seq_len)
    train_b = borders["train"]
    scaler = StandardScaler.fit(series.values[train_b[0]:train_b[1]])
    scaled = scaler.transform(series.values)
    parts = {name: WindowDataset(scaled[b1:b2], seq_len, pred_len, offset=b1, cycle=cycle, name=name)
             for name, (b1, b2) in borders.items()}
    return ForecastData(train=parts["train"], val=parts["val"], test=parts["test"], scaler=scaler,
                        columns=series.columns, borders=borders, target_only=features == "MS",
                        info={"rows": len(series.values), "kind": kind})


def load_benchmark(data: str, data_path: str | None = None, root: str | os.PathLike | None = None,
                   seq_len: int = 96, pred_len: int = 96, cycle: int | None = None,
                   features: str = "M", target: str = "OT") -> ForecastData:
    """Load a benchmark dataset (`--data` name as in the official scripts) into scaled splits."""
    path = resolve_data_file(data, data_path, root)
    kind = DATASET_KINDS[data]
    series = read_series(path, kind=kind, features=features, target=target)
    out = make_splits(series, kind, seq_len, pred_len, cycle=cycle, features=features)
    out.info["path"] = str(path)
    return out
