"""Training loop on synthetic periodic series: schedules, early stopping, learning, run files, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ltsf import (
    LTSFError,
    RunConfig,
    SeriesData,
    build_model,
    load_run_model,
    lr_after_epoch,
    make_splits,
    metrics,
    predict_windows,
    run,
    train_model,
)
from ltsf.cli import main
from ltsf.io import load_weights
from ltsf.table import load_results, markdown_table
from ltsf.train import EarlyStopping

W = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, especially on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cycle_shapes() -> np.ndarray:
    """One period (W, 2) of two channels with different shapes and levels."""
    k = np.arange(W)
    a = np.sin(2 * np.pi * k / W)
    b = 2 * np.sin(2 * np.pi * k / W) + np.sin(4 * np.pi * k / W + 1) + 1
    return np.stack([a, b], axis=1)


def sine_series(n: int = 2400, noise: float = 0.1, seed: int = 0) -> SeriesData:
    rng = np.random.default_rng(seed)
    values = cycle_shapes()[np.arange(n) % W] + noise * rng.normal(size=(n, 2))
    return SeriesData(values, ["a", "b"])


def small_cfg(**kw) -> RunConfig:
    base = dict(seq_len=48, pred_len=24, cycle=W, batch_size=64, train_epochs=5, patience=3,
                test_each_epoch=0)
    return RunConfig(**{**base, **kw}).validate()


def test_type3_schedule_and_onecycle_side_effects():
    assert [lr_after_epoch(e, "type3", 1.0) for e in (1, 2, 3, 4, 5)] == [1, 1, 1, 0.8, 0.8 ** 2]
    assert lr_after_epoch(1, "type2", 1.0) is None and lr_after_epoch(2, "type2", 1.0) == 5e-5
    assert lr_after_epoch(3, "type1", 1.0) == 0.25
    data = make_splits(sine_series(900), "custom", 48, 24, cycle=W)
    cfg = small_cfg(model="CycleNet", model_type="linear", learning_rate=0.01, train_epochs=6,
                    patience=10)
    torch.manual_seed(0)
    fit = train_model(build_model(cfg, 2), data, cfg, progress=False)
    lrs = [row["lr"] for row in fit["history"]]
    assert np.allclose(lrs, [0.01 / 25, 0.01, 0.01, 0.01, 0.008, 0.0064])
    plain = small_cfg(model="CycleNet", model_type="linear", learning_rate=0.01, train_epochs=2,
                      onecycle_init=0)
    fit = train_model(build_model(plain, 2), data, plain, progress=False)
    assert [row["lr"] for row in fit["history"]] == [0.01, 0.01]


def test_onecycle_init_sets_adam_beta1_like_the_official_loop(monkeypatch):
    seen = {}
    original = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen["betas"] = self.param_groups[0]["betas"]
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    data = make_splits(sine_series(600), "custom", 48, 24, cycle=W)
    for flag, beta1 in ((1, 0.95), (0, 0.9)):
        cfg = small_cfg(model="Linear", train_epochs=1, onecycle_init=flag)
        train_model(build_model(cfg, 2), data, cfg, progress=False)
        assert seen["betas"][0] == pytest.approx(beta1)


def test_early_stopping_keeps_the_best_state_and_counts_a_tie_as_improvement():
    """Official `utils/tools.py`: only `score < best + 0` is a miss, so an equal loss improves."""
    model = torch.nn.Linear(1, 1)
    stop = EarlyStopping(patience=2)
    improved = []
    for epoch, loss in enumerate([1.0, 0.5, 0.5, 0.7, 0.6], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        improved.append(stop.step(loss, model, epoch))
    assert improved == [True, True, True, False, False]
    assert stop.stop and stop.best_epoch == 3
    assert stop.best_state["weight"].item() == 3.0


def test_cyclenet_learned_cycle_recovers_the_period_shape():
    data = make_splits(sine_series(), "custom", 48, 24, cycle=W)
    truth = data.scaler.transform(cycle_shapes())
    for revin in (0, 1):
        cfg = small_cfg(model="CycleNet", model_type="linear", learning_rate=0.01, use_revin=revin)
        torch.manual_seed(0)
        model = build_model(cfg, 2)
        train_model(model, data, cfg, progress=False)
        q = model.cycleQueue.data.detach().numpy()
        for c in range(2):
            assert np.corrcoef(q[:, c], truth[:, c])[0, 1] > 0.9


def test_segrnn_beats_repeating_the_last_value():
    data = make_splits(sine_series(), "custom", 48, 24)
    cfg = small_cfg(model="SegRNN", seg_len=12, d_model=32, dropout=0.0, learning_rate=0.005)
    torch.manual_seed(0)
    model = build_model(cfg, 2)
    train_model(model, data, cfg, progress=False)
    pred, true = predict_windows(model, data.test)
    x, _, _ = data.test.__getitems__(list(range(len(data.test))))
    naive = np.repeat(x[:, -1:, :].numpy(), 24, axis=1)
    assert metrics(pred, true)["mse"] < 0.25 * metrics(naive, true)["mse"]


def test_ms_features_train_and_score_the_last_channel_only():
    series = sine_series(900)
    data = make_splits(series, "custom", 48, 24, cycle=W, features="MS")
    cfg = small_cfg(model="Linear", features="MS", train_epochs=1)
    model = build_model(cfg, 2)
    train_model(model, data, cfg, progress=False)
    pred, true = predict_windows(model, data.test, target_only=True)
    assert pred.shape[-1] == 1 and true.shape[-1] == 1


def write_sine_csv(path, n=900):
    s = sine_series(n)
    df = pd.DataFrame(s.values, columns=["a", "OT"])
    df.insert(0, "date", pd.date_range("2021-01-01", periods=n, freq="h").astype(str))
    df.to_csv(path, index=False)


def test_run_writes_checkpoint_and_results_and_reuses_them(tmp_path):
    write_sine_csv(tmp_path / "sine.csv")
    cfg = RunConfig(model="CycleNet", model_type="linear", data="custom", data_path="sine.csv",
                    root_path=str(tmp_path), seq_len=48, pred_len=24, cycle=W, batch_size=64,
                    train_epochs=2, learning_rate=0.01, checkpoints=str(tmp_path / "runs"))
    res = run(cfg, progress=False)
    folder = tmp_path / "runs" / cfg.setting
    assert (folder / "results.json").is_file() and (folder / "checkpoint.safetensors").is_file()
    assert res["epochs_run"] == 2 and res["params"] == 48 * 24 + 24 + W * 2
    assert run(cfg, progress=False)["cached"]
    model, cfg2 = load_run_model(folder)
    data = make_splits(sine_series(900), "custom", 48, 24, cycle=W)
    pred, true = predict_windows(model, data.test)
    assert metrics(pred, true)["mse"] == pytest.approx(res["mse"], rel=1e-5)
    table = markdown_table(load_results([tmp_path / "runs"]))
    assert "CycleNet/Linear" in table and f"{res['mse']:.4f}" in table


def test_cli_train_json_and_table(tmp_path, capsys):
    write_sine_csv(tmp_path / "sine.csv")
    argv = ["train", "--model", "SegRNN", "--data", "custom", "--data_path", "sine.csv",
            "--root_path", str(tmp_path), "--features", "M", "--seq_len", "48", "--pred_len", "24",
            "--seg_len", "24", "--d_model", "16", "--dropout", "0.5", "--rnn_type", "gru",
            "--dec_way", "pmf", "--channel_id", "1", "--train_epochs", "1", "--patience", "3",
            "--batch_size", "64", "--learning_rate", "0.001", "--lradj", "type3", "--loss", "mse",
            "--random_seed", "2024", "--is_training", "1", "--model_id", "x", "--itr", "1",
            "--checkpoints", str(tmp_path / "runs"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"mse", "mae", "epochs_run", "params"} <= set(out) and out["epochs_run"] == 1
    assert main(["table", str(tmp_path / "runs")]) == 0
    assert "| SegRNN |" in capsys.readouterr().out


def test_cli_config_file_and_grid_listing(tmp_path, capsys):
    write_sine_csv(tmp_path / "sine.csv")
    (tmp_path / "c.yaml").write_text(
        f"data: custom\ndata_path: sine.csv\nroot_path: {tmp_path}\nmodel: Linear\n"
        f"seq_len: 48\npred_len: 24\ntrain_epochs: 1\ncheckpoints: {tmp_path / 'runs'}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--pred_len", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setting"].startswith("sine_48_12_Linear")
    (tmp_path / "g.yaml").write_text(
        "defaults: {model: Linear, data: custom, data_path: x.csv}\n"
        "experiments:\n  - {grid: {pred_len: [24, 48], random_seed: [1, 2]}}\n")
    assert main(["grid", str(tmp_path / "g.yaml"), "--list", "--order", "seed"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 4 and names[0].endswith("seed1") and names[1].endswith("seed1")


@pytest.mark.parametrize("argv, match", [
    (["train", "--data", "custom"], "needs --data_path"),
    (["train", "--data_path", "nope.csv", "--root_path", "/nonexistent"], "not found"),
    (["train", "--model", "SegRNN", "--seq_len", "50", "--seg_len", "24"], "seg_len"),
    (["train", "--itr", "2"], "--itr must be 1"),
    (["train", "--config", "/nonexistent.yaml"], "not found"),
    (["table", "/nonexistent"], "does not exist"),
])
def test_cli_user_mistakes_print_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and err.startswith("ltsf: error:")


def test_enc_in_mismatch_is_a_clear_error():
    with pytest.raises(LTSFError, match="enc_in"):
        build_model(RunConfig(enc_in=5), 7)


@pytest.mark.parametrize("model, lradj", [("SegRNN", "type1"), ("CycleNet", "TST")])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, model, lradj):
    write_sine_csv(tmp_path / "sine.csv")

    def cfg(folder: str) -> RunConfig:
        return RunConfig(model=model, data="custom", data_path="sine.csv", root_path=str(tmp_path),
                         seq_len=48, pred_len=24, seg_len=24, d_model=16, dropout=0.5, batch_size=64,
                         train_epochs=3, patience=3, learning_rate=0.01, lradj=lradj, cycle=W,
                         checkpoints=str(tmp_path / folder))

    whole = run(cfg("whole"), progress=False)
    step = EarlyStopping.step

    def crash_at_epoch_2(self, val_loss, model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return step(self, val_loss, model, epoch)

    monkeypatch.setattr(EarlyStopping, "step", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg("cut"), progress=False)
    folder = tmp_path / "cut" / cfg("cut").setting
    assert not (folder / "results.json").exists()
    state = json.loads((folder / "resume.json").read_text())  # no pickle: JSON + safetensors
    assert state["epoch"] == 1 and set(load_weights(folder / "resume.safetensors")) >= {"rng.torch"}
    monkeypatch.setattr(EarlyStopping, "step", step)
    resumed = run(cfg("cut"), progress=False)
    assert resumed["resumed_after_epoch"] == 1 and whole["resumed_after_epoch"] == 0
    assert resumed["mse"] == whole["mse"] and resumed["mae"] == whole["mae"]
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in whole["history"]]
    assert not (folder / "resume.json").exists() and not (folder / "resume.safetensors").exists()


def test_nothing_in_ltsf_unpickles():
    src = Path(__file__).resolve().parents[1] / "src" / "ltsf"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text and "import pickle" not in text, path
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (path, call)


def _sine_cfg(tmp_path, **kw) -> RunConfig:
    base = dict(model="CycleNet", model_type="linear", data="custom", data_path="sine.csv",
                root_path=str(tmp_path), seq_len=48, pred_len=24, cycle=W, batch_size=64,
                train_epochs=1, learning_rate=0.01, checkpoints=str(tmp_path / "runs"))
    return RunConfig(**{**base, **kw})


def test_rerun_with_other_settings_or_data_is_refused_unless_overwrite(tmp_path):
    write_sine_csv(tmp_path / "sine.csv")
    first = run(_sine_cfg(tmp_path), progress=False)
    # same folder name, different learning rate (not part of the name)
    with pytest.raises(LTSFError, match=r"learning_rate: 0\.01 -> 0\.02.*--overwrite"):
        run(_sine_cfg(tmp_path, learning_rate=0.02), progress=False)
    # runtime-only fields may change
    assert run(_sine_cfg(tmp_path, num_threads=1), progress=False)["cached"]
    again = run(_sine_cfg(tmp_path, learning_rate=0.02), overwrite=True, progress=False)
    assert not again.get("cached") and again["config"]["learning_rate"] == 0.02
    write_sine_csv(tmp_path / "sine.csv", n=1000)  # the data file changes
    with pytest.raises(LTSFError, match="data file sine.csv: sha256"):
        run(_sine_cfg(tmp_path, learning_rate=0.02), progress=False)
    assert first["settings_hash"] != again["settings_hash"]


def test_legacy_folder_without_settings_record_is_checked_against_its_results(tmp_path):
    write_sine_csv(tmp_path / "sine.csv")
    cfg = _sine_cfg(tmp_path)
    run(cfg, progress=False)
    folder = tmp_path / "runs" / cfg.setting
    (folder / "settings.json").unlink()
    assert run(_sine_cfg(tmp_path), progress=False)["cached"]
    with pytest.raises(LTSFError, match="patience: 5 -> 7"):
        run(_sine_cfg(tmp_path, patience=7), progress=False)
