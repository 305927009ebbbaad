"""A small pandas API: fit on a DataFrame with a date column, forecast the next `pred_len` steps.

    fc = Forecaster("CycleNet", seq_len=96, pred_len=24, cycle=24).fit(df, date_col="date")
    future = fc.predict()            # DataFrame: date + one column per channel, original units
    fc.save("my_model"); fc = Forecaster.load("my_model")

Training uses the benchmark protocol for custom CSVs (70 % train / 10 % validation for early
stopping / 20 % test, reported in `test_metrics_`), scaling fitted on the training part.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .data import SeriesData, _frame_to_series, make_splits
from .errors import LTSFError
from .io import load_weights, read_json, save_weights, write_json
from .train import (
    _forward,
    build_model,
    count_parameters,
    metrics,
    predict_windows,
    seed_everything,
    train_model,
)

#: Per-model training defaults: the official look-back-96 ETTh1 script values.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "CycleNet": {"model_type": "linear", "learning_rate": 0.01, "batch_size": 256, "patience": 5},
    "SegRNN": {"seg_len": 24, "learning_rate": 0.001, "batch_size": 256, "patience": 10,
               "dropout": 0.5},
    "Linear": {"learning_rate": 0.005, "batch_size": 32, "patience": 5},
}

_STATE = "model.safetensors"
_META = "forecaster.json"


def _offset(freq: str):
    import pandas as pd

    return pd.tseries.frequencies.to_offset(freq)


def _steps_between(origin, t, freq: str) -> int:
    """Whole steps of `freq` from `origin` to `t` (negative if before); error if off the grid."""
    import pandas as pd

    off = _offset(freq)
    origin, t = pd.Timestamp(origin), pd.Timestamp(t)
    if isinstance(off, pd.offsets.Tick):
        steps = (t - origin) / pd.Timedelta(off)
        n = int(round(steps))
        ok = abs(steps - n) < 1e-9
    else:
        lo, hi = (origin, t) if t >= origin else (t, origin)
        rng = pd.date_range(lo, hi, freq=off)
        n = (len(rng) - 1) * (1 if t >= origin else -1)
        ok = len(rng) > 0 and rng[0] == lo and rng[-1] == hi
    if not ok:
        raise LTSFError(f"timestamp {t} is not on the {freq} grid that starts at {origin}; "
                        "resample the data to the fitted frequency")
    return n


class Forecaster:
    """Fit a CycleNet, SegRNN or Linear model on a DataFrame and forecast future timestamps.

    `cycle` (CycleNet's W) defaults to the steps per day for sub-daily data and 7 for daily
    data. Any other `RunConfig` field (`model_type`, `learning_rate`, `train_epochs`, ...) can
    be passed as a keyword; unset ones take `MODEL_DEFAULTS`, then the official defaults.
    """

    def __init__(self, model: str = "CycleNet", seq_len: int = 96, pred_len: int = 96,
                 cycle: int | None = None, **options: Any) -> None:
        known = set(RunConfig().to_dict())
        bad = sorted(set(options) - known)
        if bad:
            raise LTSFError(f"unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
        if model not in MODEL_DEFAULTS:
            raise LTSFError(f"unknown model {model!r}; use one of {', '.join(MODEL_DEFAULTS)}")
        values = {**MODEL_DEFAULTS[model], **options, "model": model, "seq_len": seq_len,
                  "pred_len": pred_len, "data": "custom", "data_path": "DataFrame", "features": "M",
                  "checkpoints": ""}
        self._cycle_given = cycle
        self.config = RunConfig.from_dict({**values, "cycle": cycle or 24}).validate()
        self.model: torch.nn.Module | None = None
        self.scaler = None
        self.columns: list[str] = []
        self.date_col = "date"
        self.freq: str | None = None
        self.origin = None
        self.tail: np.ndarray | None = None
        self.tail_end = None
        self.test_metrics_: dict[str, float] = {}
        self.history_: list[dict[str, float]] = []

    # ----------------------------------------------------------------- fitting
    def fit(self, df, date_col: str = "date", columns: list[str] | None = None,
            progress: bool = False) -> Forecaster:
        """Train on `df` (one row per timestamp, evenly spaced); returns self."""
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise LTSFError(f"fit expects a pandas DataFrame, got {type(df).__name__}")
        if date_col not in df.columns:
            raise LTSFError(f"no column {date_col!r} in the DataFrame; pass date_col=<timestamp column>")
        cols = list(columns) if columns is not None else [c for c in df.columns if c != date_col]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise LTSFError(f"column(s) {', '.join(map(str, missing))} not in the DataFrame")
        if not cols:
            raise LTSFError("no value columns besides the date column")
        series = _frame_to_series(df, date_col, cols, "DataFrame")
        freq = self._infer_freq(series)
        cfg = self.config
        if self._cycle_given is None and cfg.model == "CycleNet":
            cfg = replace(cfg, cycle=self._default_cycle(freq))
        cfg = replace(cfg, enc_in=None).validate()
        data = make_splits(series, "custom", cfg.seq_len, cfg.pred_len, cycle=cfg.cycle)
        seed_everything(cfg.random_seed)
        model = build_model(cfg, data.n_channels)
        fit = train_model(model, data, cfg, checkpoint=None, progress=progress)
        pred, true = predict_windows(model, data.test, cfg.batch_size)
        self.config, self.model, self.scaler = cfg, model, data.scaler
        self.columns, self.date_col, self.freq = series.columns, date_col, freq
        self.origin = pd.Timestamp(series.dates[0])
        self.tail = series.values[-cfg.seq_len:].copy()
        self.tail_end = pd.Timestamp(series.dates[-1])
        self.test_metrics_ = metrics(pred, true)
        self.history_ = fit["history"]
        return self

    @staticmethod
    def _infer_freq(series: SeriesData) -> str:
        import pandas as pd

        idx = pd.DatetimeIndex(series.dates)
        if len(idx) < 3:
            raise LTSFError("need at least 3 timestamps to infer the frequency")
        if not idx.is_monotonic_increasing or idx.has_duplicates:
            raise LTSFError("dates must be strictly increasing; sort the DataFrame and drop duplicates")
        freq = pd.DatetimeIndex(idx.to_numpy(), freq="infer").freqstr
        if freq is None:
            raise LTSFError("dates are not evenly spaced (no frequency could be inferred); "
                            "resample to a regular grid first")
        return freq

    @staticmethod
    def _default_cycle(freq: str) -> int:
        import pandas as pd

        off = _offset(freq)
        if isinstance(off, pd.offsets.Tick):
            day = pd.Timedelta(days=1)
            step = pd.Timedelta(off)
            if step < day and day % step == pd.Timedelta(0):
                return int(day / step)
            if step == day:
                return 7
        raise LTSFError(f"cannot choose a cycle length for frequency {freq}; pass cycle=<steps per period>")

    # -------------------------------------------------------------- predicting
    def _check_fitted(self) -> None:
        if self.model is None:
            raise LTSFError("this Forecaster is not fitted; call fit(df) or Forecaster.load(path)")

    def predict(self, df=None):
        """Forecast the `pred_len` steps after the last row of `df` (default: the fitted data).

        Returns a DataFrame with the date column (future timestamps) and one column per channel
        in the original units.
        """
        import pandas as pd

        self._check_fitted()
        cfg = self.config
        if df is None:
            values, end = self.tail, self.tail_end
        else:
            if not isinstance(df, pd.DataFrame):
                raise LTSFError(f"predict expects a pandas DataFrame, got {type(df).__name__}")
            missing = [c for c in [self.date_col, *self.columns] if c not in df.columns]
            if missing:
                raise LTSFError(f"column(s) {', '.join(map(str, missing))} missing; predict needs "
                                "the date column and the fitted value columns")
            if len(df) < cfg.seq_len:
                raise LTSFError(f"predict needs the last {cfg.seq_len} rows (seq_len), got {len(df)}")
            part = df.iloc[-cfg.seq_len:]
            series = _frame_to_series(part, self.date_col, self.columns, "DataFrame")
            idx = pd.DatetimeIndex(series.dates)
            if not idx.is_monotonic_increasing or idx.has_duplicates:
                raise LTSFError("dates must be strictly increasing; sort the DataFrame first")
            values, end = series.values, pd.Timestamp(idx[-1])
        start = _offset(self.freq) * (cfg.seq_len - 1)
        first = pd.Timestamp(end) - start
        phase = _steps_between(self.origin, first, self.freq) % cfg.cycle
        x = torch.as_tensor(self.scaler.transform(values), dtype=torch.float32).unsqueeze(0)
        self.model.eval()
        with torch.no_grad():
            y = _forward(self.model, x, torch.tensor([phase]))
        out = self.scaler.inverse_transform(y[0].cpu().numpy().astype(np.float64))
        dates = pd.date_range(end, periods=cfg.pred_len + 1, freq=self.freq)[1:]
        frame = pd.DataFrame(out, columns=self.columns)
        frame.insert(0, self.date_col, dates)
        return frame

    def evaluate(self) -> dict[str, float]:
        """Test-part MSE/MAE (scaled units) measured at the end of `fit`."""
        self._check_fitted()
        return dict(self.test_metrics_)

    @property
    def n_parameters(self) -> int:
        """Trainable parameters of the fitted model."""
        self._check_fitted()
        return count_parameters(self.model)

    # ---------------------------------------------------------------- persist
    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights (safetensors) and everything needed to predict into folder `path`."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_weights(path / _STATE, self.model.state_dict())  # copied to the CPU
        meta = {"config": self.config.to_dict(), "columns": self.columns, "date_col": self.date_col,
                "freq": self.freq, "origin": self.origin.isoformat(),
                "scaler": self.scaler.to_dict(), "tail": self.tail.tolist(),
                "tail_end": self.tail_end.isoformat(), "test_metrics": self.test_metrics_}
        write_json(path / _META, meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Forecaster:
        """Load a Forecaster written by `save`."""
        import pandas as pd

        from .data import StandardScaler

        path = Path(path)
        if not (path / _META).is_file() or not (path / _STATE).is_file():
            raise LTSFError(f"{path} is not a saved Forecaster (needs {_META} and {_STATE})")
        meta = read_json(path / _META, "saved Forecaster metadata")
        if not isinstance(meta, dict) or not {"config", "columns", "scaler"} <= set(meta):
            raise LTSFError(f"{path / _META} lacks config/columns/scaler; save the Forecaster again")
        cfg = RunConfig.from_dict(meta["config"])
        fc = cls(cfg.model, cfg.seq_len, cfg.pred_len, cfg.cycle)
        fc.config = cfg
        fc.model = build_model(cfg, len(meta["columns"]))
        fc.model.load_state_dict(load_weights(path / _STATE))
        fc.columns, fc.date_col, fc.freq = meta["columns"], meta["date_col"], meta["freq"]
        fc.origin = pd.Timestamp(meta["origin"])
        fc.scaler = StandardScaler.from_dict(meta["scaler"])
        fc.tail = np.asarray(meta["tail"], dtype=np.float64)
        fc.tail_end = pd.Timestamp(meta["tail_end"])
        fc.test_metrics_ = meta.get("test_metrics", {})
        return fc
