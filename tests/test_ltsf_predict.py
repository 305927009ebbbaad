"""`ltsf predict`: CSV and PNG in the data's units, metrics equal to the run's, future dates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ltsf import RunConfig, run
from ltsf.cli import main
from ltsf.train import metrics

W = 24


def write_sine_csv(path, n: int = 900) -> None:
    """Two noisy daily cycles (channels `a`, `OT`) on an hourly grid, in units far from 0/1."""
    rng = np.random.default_rng(0)
    t = np.arange(n)
    values = np.stack([10 + 3 * np.sin(2 * np.pi * t / W), 50 + 8 * np.cos(2 * np.pi * t / W)], axis=1)
    df = pd.DataFrame(values + rng.normal(scale=0.3, size=values.shape), columns=["a", "OT"])
    df.insert(0, "date", pd.date_range("2021-01-01", periods=n, freq="h").astype(str))
    df.to_csv(path, index=False)


@pytest.fixture()
def trained(tmp_path):
    write_sine_csv(tmp_path / "sine.csv")
    cfg = RunConfig(model="DLinear", rcf=1, data="custom", data_path="sine.csv", root_path=str(tmp_path),
                    seq_len=48, pred_len=24, cycle=W, batch_size=64, train_epochs=2,
                    learning_rate=0.01, checkpoints=str(tmp_path / "runs"))
    res = run(cfg, progress=False)
    return tmp_path, tmp_path / "runs" / cfg.setting, res


def test_predict_all_test_windows_reproduces_the_run_metrics(trained, capsys):
    tmp_path, folder, res = trained
    assert main(["predict", "--run", str(folder), "--windows", "all", "--out", str(tmp_path / "p")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mse"] == pytest.approx(res["mse"], rel=1e-6) and out["mae"] == pytest.approx(res["mae"], rel=1e-6)
    frame = pd.read_csv(tmp_path / "p" / "forecast.csv")
    assert list(frame.columns) == ["origin", "timestamp", "channel", "step", "forecast", "actual"]
    n_windows = res["windows"]["test"]
    assert len(frame) == n_windows * 24 * 2
    # the original units: the CSV's actual column is the raw file's value at that timestamp
    raw = pd.read_csv(tmp_path / "sine.csv", parse_dates=["date"]).set_index("date")
    row = frame[frame.channel == "OT"].iloc[-1]
    assert row["actual"] == pytest.approx(raw.loc[pd.Timestamp(row["timestamp"]), "OT"])
    err = frame["forecast"] - frame["actual"]
    assert np.sqrt(np.mean(err ** 2)) > 0
    assert (tmp_path / "p" / "forecast_OT.png").stat().st_size > 1000


def test_predict_future_dates_follow_the_file(trained, capsys):
    tmp_path, folder, _ = trained
    assert main(["predict", "--run", str(folder), "--split", "future", "--channels", "a", "OT",
                 "--out", str(tmp_path / "f")]) == 0
    frame = pd.read_csv(tmp_path / "f" / "forecast.csv", parse_dates=["timestamp", "origin"])
    last = pd.read_csv(tmp_path / "sine.csv", parse_dates=["date"])["date"].iloc[-1]
    assert frame["origin"].iloc[0] == last and frame["timestamp"].min() == last + pd.Timedelta(hours=1)
    assert frame["actual"].isna().all() and len(frame) == 24 * 2
    assert (tmp_path / "f" / "forecast_a.png").is_file() and not (tmp_path / "f" / "metrics.json").exists()


@pytest.mark.parametrize("argv, match", [
    (["predict", "--out", "x"], "exactly one of --run"),
    (["predict", "--run", "/nonexistent", "--out", "x"], "holds no results.json"),
    (["predict", "--checkpoint", "c.pth", "--out", "x"], "needs --data"),
])
def test_predict_mistakes_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_metrics_known_values():
    pred = np.array([[[1.0], [2.0]], [[3.0], [5.0]]])
    true = np.array([[[1.0], [3.0]], [[2.0], [4.0]]])
    m = metrics(pred, true)
    assert m["mse"] == pytest.approx(0.75) and m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(np.sqrt(0.75))
    assert m["rse"] == pytest.approx(np.sqrt(3.0) / np.sqrt(5.0))
    assert m["corr"] == pytest.approx(np.corrcoef(pred.ravel(), true.ravel())[0, 1])
