"""Data protocol: splits, train-fitted scaling, windows, cycle phases (incl. wrap-around), errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ltsf import (
    CycleNet,
    LTSFError,
    SeriesData,
    StandardScaler,
    WindowDataset,
    load_benchmark,
    make_splits,
    split_borders,
)
from ltsf.data import read_series


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, especially on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_ett_borders_match_the_12_4_4_month_protocol():
    b = split_borders("ETTh", 17420, 96)
    assert b == {"train": (0, 8640), "val": (8640 - 96, 11520), "test": (11520 - 96, 14400)}
    m = split_borders("ETTm", 69680, 96)
    assert m == {"train": (0, 34560), "val": (34560 - 96, 46080), "test": (46080 - 96, 57600)}


def test_custom_and_solar_borders():
    b = split_borders("custom", 1001, 24)
    # train int(0.7n)=700, test int(0.2n)=200, val = the rest = 101
    assert b == {"train": (0, 700), "val": (676, 801), "test": (1001 - 200 - 24, 1001)}
    s = split_borders("Solar", 1001, 24)
    assert s["val"] == (676, 800)  # the Solar loader's val part ends at train + int(0.1 n)


def test_short_file_and_long_lookback_are_clear_errors():
    with pytest.raises(LTSFError, match="12/4/4"):
        split_borders("ETTh", 1000, 96)
    with pytest.raises(LTSFError, match="seq_len"):
        split_borders("custom", 100, 80)


def test_scaler_uses_train_rows_only_and_handles_constant_channels():
    values = np.concatenate([np.random.default_rng(0).normal(size=(700, 2)),
                             np.full((300, 2), 1000.0)])
    values[:, 1] = 5.0
    data = make_splits(SeriesData(values, ["a", "b"]), "custom", seq_len=10, pred_len=5)
    assert np.allclose(data.scaler.mean, values[:700].mean(0))
    assert np.allclose(data.scaler.scale[0], values[:700, 0].std())
    assert data.scaler.scale[1] == 1.0
    x, _, _ = data.train[0]
    assert torch.allclose(x[:, 1], torch.zeros(10))
    back = data.scaler.inverse_transform(data.scaler.transform(values))
    assert np.allclose(back, values)


def test_windows_cover_the_right_rows_and_count():
    values = np.arange(60, dtype=float).reshape(30, 2)
    ds = WindowDataset(values, seq_len=4, pred_len=3, offset=100, cycle=7)
    assert len(ds) == 30 - 4 - 3 + 1
    x, y, p = ds[5]
    assert torch.equal(x, torch.tensor(values[5:9], dtype=torch.float32))
    assert torch.equal(y, torch.tensor(values[9:12], dtype=torch.float32))
    assert int(p) == (100 + 5) % 7
    xb, yb, pb = ds.__getitems__([0, 5, 23])
    assert xb.shape == (3, 4, 2) and yb.shape == (3, 3, 2)
    assert torch.equal(xb[1], x) and pb.tolist() == [100 % 7, 105 % 7, 123 % 7]


def test_cycle_phase_alignment_for_windows_wrapping_the_cycle():
    """With Q set to the true cycle, Q read from each window's phase is exactly its input and target.

    W = 7 does not divide seq_len = 10, the borders or the offsets, so windows start at every phase
    and their input and target spans wrap around the cycle; all three parts are checked.
    """
    cycle, seq_len, pred_len, channels = 7, 10, 5, 3
    rng = np.random.default_rng(1)
    pattern = rng.normal(size=(cycle, channels))
    t = np.arange(503)
    series = SeriesData(pattern[t % cycle], ["a", "b", "c"])
    data = make_splits(series, "custom", seq_len, pred_len, cycle=cycle)
    scaled_pattern = torch.tensor(data.scaler.transform(pattern), dtype=torch.float32)
    model = CycleNet(seq_len, pred_len, channels, cycle, model_type="linear", use_revin=False)
    with torch.no_grad():
        model.cycleQueue.data.copy_(scaled_pattern)
        model.model.weight.zero_()
        model.model.bias.zero_()
    seen_phases = set()
    for part in (data.train, data.val, data.test):
        assert part.offset % cycle != 0 or part is data.train
        idx = list(range(len(part)))
        x, y, phase = part.__getitems__(idx)
        seen_phases.update(phase.tolist())
        assert torch.allclose(model.cycleQueue(phase, seq_len), x, atol=1e-5)
        assert torch.allclose(model(x, phase), y, atol=1e-5)
    assert seen_phases == set(range(cycle))


def _write_csv(path, n=400, cols=("a", "OT")):
    dates = pd.date_range("2020-01-01", periods=n, freq="h")
    df = pd.DataFrame({"date": dates.astype(str)})
    for i, c in enumerate(cols):
        df[c] = np.sin(np.arange(n) / 5 + i)
    df.to_csv(path, index=False)
    return df


def test_custom_csv_moves_target_last_and_features_s(tmp_path):
    _write_csv(tmp_path / "x.csv", cols=("OT", "a", "b"))
    s = read_series(tmp_path / "x.csv", kind="custom", features="M", target="OT")
    assert s.columns == ["a", "b", "OT"]
    s1 = read_series(tmp_path / "x.csv", kind="custom", features="S", target="OT")
    assert s1.columns == ["OT"] and s1.values.shape == (400, 1)
    data = load_benchmark("custom", "x.csv", tmp_path, seq_len=24, pred_len=12, features="MS")
    assert data.target_only and data.n_channels == 3


@pytest.mark.parametrize("content, match", [
    ("time,a\n2020-01-01,1\n", "no 'date' column"),
    ("date,a,OT\n2020-01-01,x,1\n2020-01-02,y,2\n", "not numeric"),
    ("date,a,OT\n2020-01-01,1,\n2020-01-02,2,3\n", "missing or infinite"),
])
def test_bad_files_give_one_clear_error(tmp_path, content, match):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(LTSFError, match=match):
        load_benchmark("custom", "bad.csv", tmp_path, seq_len=1, pred_len=1)


def test_missing_file_unknown_dataset_and_short_data(tmp_path):
    with pytest.raises(LTSFError, match="not found"):
        load_benchmark("ETTh1", None, tmp_path)
    with pytest.raises(LTSFError, match="unknown --data"):
        load_benchmark("ETTh9", None, tmp_path)
    with pytest.raises(LTSFError, match="needs --data_path"):
        load_benchmark("custom", None, tmp_path)
    _write_csv(tmp_path / "short.csv", n=60)
    with pytest.raises(LTSFError, match="fewer than seq_len"):
        load_benchmark("custom", "short.csv", tmp_path, seq_len=8, pred_len=30)


def test_data_root_from_environment(tmp_path, monkeypatch):
    _write_csv(tmp_path / "y.csv")
    monkeypatch.setenv("LTSF_DATA", str(tmp_path))
    data = load_benchmark("custom", "y.csv", None, seq_len=24, pred_len=24)
    assert data.info["path"] == str(tmp_path / "y.csv")


def test_scaler_round_trip_dict():
    sc = StandardScaler.fit(np.random.default_rng(0).normal(size=(50, 3)))
    sc2 = StandardScaler.from_dict(sc.to_dict())
    assert np.allclose(sc.mean, sc2.mean) and np.allclose(sc.scale, sc2.scale)
