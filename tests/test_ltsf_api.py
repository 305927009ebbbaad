"""The pandas API: fit on a DataFrame, forecast future timestamps, save/load, input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ltsf import Forecaster, LTSFError

W = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, especially on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def frame(n: int = 1500, start: str = "2022-03-01 00:00", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return pd.DataFrame({
        "timestamp": pd.date_range(start, periods=n, freq="h"),
        "load": 10 + 3 * np.sin(2 * np.pi * t / W) + 0.1 * rng.normal(size=n),
        "temp": 20 + np.cos(2 * np.pi * t / W) + 0.1 * rng.normal(size=n),
    })


@pytest.fixture(scope="module")
def fitted() -> tuple[Forecaster, pd.DataFrame]:
    df = frame()
    fc = Forecaster("CycleNet", seq_len=48, pred_len=24, train_epochs=10, batch_size=64)
    return fc.fit(df, date_col="timestamp"), df


def test_fit_predict_returns_future_timestamps_in_original_units(fitted):
    fc, df = fitted
    assert fc.config.cycle == 24  # hourly data -> daily cycle
    out = fc.predict()
    assert list(out.columns) == ["timestamp", "load", "temp"] and len(out) == 24
    assert out["timestamp"].iloc[0] == df["timestamp"].iloc[-1] + pd.Timedelta(hours=1)
    assert (out["timestamp"].diff().dropna() == pd.Timedelta(hours=1)).all()
    t = np.arange(len(df), len(df) + 24)
    expected = 10 + 3 * np.sin(2 * np.pi * t / W)
    assert np.abs(out["load"].to_numpy() - expected).max() < 0.6
    assert fc.evaluate()["mse"] < 0.1 and fc.n_parameters == 48 * 24 + 24 + W * 2


def test_predict_on_a_later_frame_uses_its_cycle_phase(fitted):
    fc, df = fitted
    later = frame(n=1500 + 13)
    out = fc.predict(later)
    assert out["timestamp"].iloc[0] == later["timestamp"].iloc[-1] + pd.Timedelta(hours=1)
    t = np.arange(len(later), len(later) + 24)
    assert np.abs(out["load"].to_numpy() - (10 + 3 * np.sin(2 * np.pi * t / W))).max() < 0.6


def test_save_and_load_round_trip(fitted, tmp_path):
    fc, df = fitted
    fc.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = Forecaster.load(tmp_path / "m")
    pd.testing.assert_frame_equal(again.predict(), fc.predict())
    pd.testing.assert_frame_equal(again.predict(df.iloc[:700]), fc.predict(df.iloc[:700]))


@pytest.mark.parametrize("model, options", [
    ("SegRNN", {"seg_len": 12, "d_model": 16}),
    ("Linear", {}),
])
def test_other_models_fit_and_predict(model, options):
    fc = Forecaster(model, seq_len=48, pred_len=24, train_epochs=1, **options)
    out = fc.fit(frame(600), date_col="timestamp").predict()
    assert out.shape == (24, 3) and np.isfinite(out[["load", "temp"]].to_numpy()).all()


def test_monthly_data_needs_an_explicit_cycle_only_for_cyclenet():
    df = frame(300).assign(timestamp=pd.date_range("2000-01-01", periods=300, freq="MS"))
    with pytest.raises(LTSFError, match="pass cycle="):
        Forecaster("CycleNet", seq_len=24, pred_len=12, train_epochs=1).fit(df, date_col="timestamp")
    out = Forecaster("Linear", seq_len=24, pred_len=12, train_epochs=1).fit(
        df, date_col="timestamp").predict()
    assert out["timestamp"].iloc[0] == pd.Timestamp("2025-01-01")
    fc = Forecaster("CycleNet", seq_len=24, pred_len=12, cycle=12, train_epochs=1)
    assert len(fc.fit(df, date_col="timestamp").predict(df.iloc[:100])) == 12


def test_bad_inputs_give_clear_errors(fitted):
    fc, df = fitted
    with pytest.raises(LTSFError, match="no column 'date'"):
        Forecaster().fit(df)
    with pytest.raises(LTSFError, match="strictly increasing"):
        Forecaster(seq_len=48, pred_len=24).fit(df.iloc[::-1], date_col="timestamp")
    with pytest.raises(LTSFError, match="evenly spaced"):
        Forecaster(seq_len=48, pred_len=24).fit(df.drop(index=[5, 9]), date_col="timestamp")
    bad = df.copy()
    bad.loc[3, "load"] = np.nan
    with pytest.raises(LTSFError, match="missing"):
        Forecaster(seq_len=48, pred_len=24).fit(bad, date_col="timestamp")
    with pytest.raises(LTSFError, match="not numeric"):
        Forecaster(seq_len=48, pred_len=24).fit(df.assign(tag="x"), date_col="timestamp")
    with pytest.raises(LTSFError, match="not fitted"):
        Forecaster().predict()
    with pytest.raises(LTSFError, match="unknown option"):
        Forecaster(learning_rat=0.1)
    with pytest.raises(LTSFError, match="last 48 rows"):
        fc.predict(df.iloc[:10])
    shifted = df.assign(timestamp=df["timestamp"] + pd.Timedelta(minutes=30))
    with pytest.raises(LTSFError, match="not on the"):
        fc.predict(shifted)
    with pytest.raises(LTSFError, match="not a saved Forecaster"):
        Forecaster.load("/nonexistent")
