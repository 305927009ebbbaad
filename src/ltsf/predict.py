"""`ltsf predict`: forecasts of a trained run (or an official checkpoint) in the data's units.

Writes `forecast.csv` (columns `origin, timestamp, channel, step, forecast, actual`; `origin` is
the timestamp of the window's last input row, `actual` is empty past the end of the file), one
PNG per chosen channel (history, forecast, actual of the last chosen window) and, when the
truth is known, `metrics.json` (all `ltsf.train.metrics`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .data import (
    DATASET_KINDS,
    SeriesData,
    StandardScaler,
    read_series,
    resolve_data_file,
    split_borders,
)
from .errors import LTSFError
from .io import read_json, write_json, write_text
from .train import RESULTS, _forward, load_run_model, metrics

log = logging.getLogger(__name__)


@dataclass
class Forecasts:
    """Forecasts for chosen windows: `pred` `(N, H, C')` in the original units, `actual` or None."""

    starts: list[int]
    pred: np.ndarray
    actual: np.ndarray | None
    channels: list[str]
    timestamps: list[list[Any]]
    origins: list[Any]
    history: np.ndarray
    scores: dict[str, float] | None


def _window_starts(n_rows: int, borders: dict[str, tuple[int, int]] | None, seq_len: int,
                   pred_len: int, split: str, windows: str) -> list[int]:
    if split == "future":
        if n_rows < seq_len:
            raise LTSFError(f"the data has {n_rows} rows, fewer than seq_len {seq_len}")
        return [n_rows - seq_len]
    b1, b2 = borders["test"]
    starts = list(range(b1, b2 - seq_len - pred_len + 1))
    if not starts:
        raise LTSFError("the test part holds no full window; use --split future")
    if windows == "all":
        return starts
    if windows == "last":
        return starts[-1:]
    try:
        n = int(windows)
    except ValueError:
        raise LTSFError(f"--windows must be last, all or a number, got {windows!r}") from None
    if n < 1:
        raise LTSFError(f"--windows must be at least 1, got {n}")
    return starts[-n:]


def _phase_offset(series: SeriesData, reference: SeriesData | None, freq: str | None) -> int:
    """Rows between the reference file's first row and this file's (0 for the same file)."""
    if reference is None or series.dates is None or reference.dates is None:
        return 0
    from .forecaster import _steps_between

    return _steps_between(reference.dates[0], series.dates[0], freq)


def _freq(series: SeriesData) -> str | None:
    import pandas as pd

    if series.dates is None or len(series.dates) < 3:
        return None
    try:
        return pd.DatetimeIndex(series.dates[-50:], freq="infer").freqstr
    except ValueError:
        return None


def forecast(model: nn.Module, cfg: RunConfig, series: SeriesData, scaler: StandardScaler,
             split: str = "test", windows: str = "last", phase_offset: int = 0) -> Forecasts:
    """Forecast the chosen windows of `series` and undo the scaling (see module docstring)."""
    import pandas as pd

    if split not in ("test", "future"):
        raise LTSFError(f"--split must be test or future, got {split!r}")
    n = len(series.values)
    if series.values.shape[1] != len(scaler.mean):
        raise LTSFError(f"the data has {series.values.shape[1]} channels, the model was trained on "
                        f"{len(scaler.mean)}; give a file with the training columns")
    kind = DATASET_KINDS.get(cfg.data, "custom")
    borders = split_borders(kind, n, cfg.seq_len) if split == "test" else None
    starts = _window_starts(n, borders, cfg.seq_len, cfg.pred_len, split, windows)
    scaled = scaler.transform(series.values)
    x = torch.as_tensor(np.stack([scaled[s:s + cfg.seq_len] for s in starts]), dtype=torch.float32)
    phase = torch.as_tensor([(s + phase_offset) % cfg.cycle for s in starts])
    model.eval()
    with torch.no_grad():
        y = _forward(model, x, phase).cpu().numpy().astype(np.float64)
    target_only = cfg.features == "MS"
    mean, scale = (scaler.mean[-1:], scaler.scale[-1:]) if target_only else (scaler.mean, scaler.scale)
    if target_only:
        y = y[..., -1:]
    pred = y * scale + mean
    channels = series.columns[-1:] if target_only else list(series.columns)
    freq = _freq(series)
    timestamps, origins, actual, scores = [], [], None, None
    for s in starts:
        end = s + cfg.seq_len
        if series.dates is not None:
            origins.append(pd.Timestamp(series.dates[end - 1]))
            if split == "future":
                if freq is None:
                    raise LTSFError("cannot infer the data's frequency to date the future steps")
                timestamps.append(list(pd.date_range(origins[-1], periods=cfg.pred_len + 1, freq=freq)[1:]))
            else:
                timestamps.append([pd.Timestamp(t) for t in series.dates[end:end + cfg.pred_len]])
        else:
            origins.append(end - 1)
            timestamps.append(list(range(end, end + cfg.pred_len)))
    if split == "test":
        cols = slice(-1, None) if target_only else slice(None)
        actual = np.stack([series.values[s + cfg.seq_len:s + cfg.seq_len + cfg.pred_len, cols]
                           for s in starts])
        true_scaled = np.stack([scaled[s + cfg.seq_len:s + cfg.seq_len + cfg.pred_len, cols]
                                for s in starts])
        scores = metrics(y, true_scaled, scaler)
    last = starts[-1]
    history = series.values[last:last + cfg.seq_len]
    return Forecasts(starts, pred, actual, channels, timestamps, origins, history, scores)


def write_outputs(fc: Forecasts, out_dir: str | os.PathLike, plot_channels: list[str] | None = None,
                  title: str = "") -> dict[str, Any]:
    """Write `forecast.csv`, one PNG per channel in `plot_channels` and `metrics.json`."""
    import pandas as pd

    out = Path(out_dir)
    rows = []
    n, h, c = fc.pred.shape
    for w in range(n):
        for ci, name in enumerate(fc.channels):
            for k in range(h):
                rows.append((fc.origins[w], fc.timestamps[w][k], name, k + 1, fc.pred[w, k, ci],
                             fc.actual[w, k, ci] if fc.actual is not None else None))
    frame = pd.DataFrame(rows, columns=["origin", "timestamp", "channel", "step", "forecast", "actual"])
    write_text(out / "forecast.csv", frame.to_csv(index=False))
    written: dict[str, Any] = {"csv": str(out / "forecast.csv"), "png": []}
    chosen = plot_channels or [fc.channels[-1]]
    unknown = [ch for ch in chosen if ch not in fc.channels]
    if unknown:
        raise LTSFError(f"channel(s) {', '.join(unknown)} not forecast; choose from {', '.join(fc.channels)}")
    for ch in chosen:
        written["png"].append(str(_plot(fc, ch, out, title)))
    if fc.scores is not None:
        write_json(out / "metrics.json", {"windows": n, **fc.scores})
        written["metrics"] = fc.scores
    return written


def _plot(fc: Forecasts, channel: str, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ci = fc.channels.index(channel)
    hist_ci = ci if fc.history.shape[1] == len(fc.channels) else -1
    seq_len, horizon = fc.history.shape[0], fc.pred.shape[1]
    t_hist = np.arange(-seq_len + 1, 1)
    t_fut = np.arange(1, horizon + 1)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(t_hist, fc.history[:, hist_ci], color="0.35", lw=1.2, label="history")
    if fc.actual is not None:
        ax.plot(t_fut, fc.actual[-1, :, ci], color="tab:green", lw=1.2, label="actual")
    ax.plot(t_fut, fc.pred[-1, :, ci], color="tab:orange", lw=1.6, label="forecast")
    ax.axvline(0.5, color="0.6", ls=":", lw=1)
    ax.set_xlabel(f"steps from the forecast origin ({fc.origins[-1]})")
    ax.set_ylabel(f"{channel} (data units)")
    ax.set_title(title or f"{channel}: {horizon}-step forecast")
    ax.legend(loc="best", frameon=False)
    fig.tight_layout()
    path = out / f"forecast_{''.join(ch if ch.isalnum() else '_' for ch in channel)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def predict_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, data: str | None = None,
                split: str = "test", windows: str = "last",
                channels: list[str] | None = None) -> dict[str, Any]:
    """Forecasts of a run folder written by `ltsf train` (scaling: the run's training statistics)."""
    run_dir = Path(run_dir)
    model, cfg = load_run_model(run_dir)
    info = read_json(run_dir / RESULTS, "run results")
    own = resolve_data_file(cfg.data, cfg.data_path, cfg.root_path)
    kind = DATASET_KINDS[cfg.data]
    reference = read_series(own, kind=kind, features=cfg.features, target=cfg.target)
    if "scaler" in info:
        scaler = StandardScaler.from_dict(info["scaler"])
    else:  # runs written before the scaler was recorded: refit on the training rows
        b1, b2 = split_borders(kind, len(reference.values), cfg.seq_len)["train"]
        scaler = StandardScaler.fit(reference.values[b1:b2])
    if data is None:
        series, offset = reference, 0
    else:
        path = Path(data).expanduser()
        if not path.is_file():
            raise LTSFError(f"--data {path} not found")
        series = read_series(path, kind=kind, features=cfg.features, target=cfg.target)
        offset = _phase_offset(series, reference, _freq(reference))
    fc = forecast(model, cfg, series, scaler, split=split, windows=windows, phase_offset=offset)
    return write_outputs(fc, out_dir, channels, title=f"{cfg.setting} ({split})")


def predict_checkpoint(checkpoint: str | os.PathLike, data: str, out_dir: str | os.PathLike,
                       model: str = "CycleNet", data_kind: str | None = None, split: str = "test",
                       windows: str = "last", channels: list[str] | None = None,
                       **official_flags: Any) -> dict[str, Any]:
    """Forecasts of an official checkpoint on `data` (scaler fitted on its training part, as
    the official loaders; `data_kind` = the official `--data` name, default from the file name)."""
    from dataclasses import replace

    from .checkpoint import load_checkpoint

    path = Path(data).expanduser()
    if not path.is_file():
        raise LTSFError(f"--data {path} not found")
    name = data_kind or next((k for k in ("ETTh1", "ETTh2", "ETTm1", "ETTm2") if path.stem == k),
                             "Solar" if path.suffix == ".txt" else "custom")
    if name not in DATASET_KINDS:
        raise LTSFError(f"--data_kind {name!r} is not one of {', '.join(DATASET_KINDS)}")
    loaded = load_checkpoint(checkpoint, model=model, **official_flags)
    cfg = replace(loaded.config, data=name)
    kind = DATASET_KINDS[name]
    series = read_series(path, kind=kind, features=cfg.features, target=cfg.target)
    b1, b2 = split_borders(kind, len(series.values), cfg.seq_len)["train"]
    scaler = StandardScaler.fit(series.values[b1:b2])
    fc = forecast(loaded.model, cfg, series, scaler, split=split, windows=windows)
    return write_outputs(fc, out_dir, channels, title=f"{Path(checkpoint).parent.name} ({split})")
