"""Training with early stopping, the official learning-rate schedules, test metrics and run files.

The loop mirrors the official `Exp_Main.train/test` (see `docs/ltsf.md`): Adam; each epoch the
training loader is shuffled with the last incomplete batch dropped, the validation loader is
shuffled and drops its last batch too (its loss is the mean of the batch losses), the test loss
is computed for the log; early stopping on the validation loss keeps the best weights, which are
tested at the end on every test window (`drop_last = False`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm  # not tqdm.auto: its async wrapper calls iter() twice, an extra RNG draw

from .config import RunConfig
from .data import (
    ForecastData,
    StandardScaler,
    WindowDataset,
    collate_batch,
    load_benchmark,
    resolve_data_file,
)
from .errors import LTSFError
from .io import load_weights, read_json, save_weights, write_json
from .models import MLP, MODELS, RCF, CycleNet, DLinear, Linear, SegRNN
from .state import (
    SETTINGS,
    check_run_folder,
    clear_resume,
    load_resume,
    restore_rng,
    save_resume,
    settings_record,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
RESULTS = "results.json"


def build_model(cfg: RunConfig, enc_in: int) -> nn.Module:
    """Instantiate `cfg.model` for `enc_in` channels (float32, on the CPU), wrapped in RCF if `--rcf 1`."""
    if cfg.enc_in is not None and cfg.enc_in != enc_in:
        raise LTSFError(f"--enc_in {cfg.enc_in} does not match the data, which has {enc_in} "
                        "channels; drop --enc_in or set it to the number of channels")
    cfg.validate()
    if cfg.model == "CycleNet":
        return CycleNet(cfg.seq_len, cfg.pred_len, enc_in, cfg.cycle, model_type=cfg.model_type,
                        d_model=cfg.d_model, use_revin=cfg.revin).float()
    revin = cfg.revin and not cfg.rcf  # with RCF the normalisation wraps the cycle removal
    if cfg.model == "SegRNN":
        model: nn.Module = SegRNN(cfg.seq_len, cfg.pred_len, enc_in, seg_len=cfg.seg_len,
                                  d_model=cfg.d_model, dropout=cfg.effective_dropout,
                                  rnn_type=cfg.rnn_type, dec_way=cfg.dec_way,
                                  channel_id=bool(cfg.channel_id), revin=revin)
    elif cfg.model == "Linear":
        model = Linear(cfg.seq_len, cfg.pred_len, use_revin=revin)
    elif cfg.model == "MLP":
        model = MLP(cfg.seq_len, cfg.pred_len, d_model=cfg.d_model, use_revin=revin)
    elif cfg.model == "DLinear":
        model = DLinear(cfg.seq_len, cfg.pred_len, enc_in, individual=bool(cfg.individual))
    else:
        raise LTSFError(f"unknown --model {cfg.model!r}; use one of {', '.join(MODELS)}")
    if cfg.rcf:
        model = RCF(model, cfg.seq_len, cfg.pred_len, enc_in, cfg.cycle, use_revin=cfg.revin)
    return model.float()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch as the official `run.py` does (before building the model)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_after_epoch(epoch: int, lradj: str, base: float) -> float | None:
    """Learning rate set after finishing (1-based) `epoch`, or None to keep it (official table).

    `type3`: `base` for epoch < 3, else `base * 0.8 ** (epoch - 3)`; the new rate applies from
    the next epoch, so epochs 2-4 run at `base` and epoch e >= 4 at `base * 0.8 ** (e - 4)`.
    """
    if lradj == "type1":
        return base * 0.5 ** (epoch - 1)
    if lradj == "type2":
        return {2: 5e-5, 4: 1e-5, 6: 5e-6, 8: 1e-6, 10: 5e-7, 15: 1e-7, 20: 5e-8}.get(epoch)
    if lradj == "type3":
        return base if epoch < 3 else base * 0.8 ** (epoch - 3)
    if lradj == "constant":
        return base
    steps = {"3": 10, "4": 15, "5": 25, "6": 5}
    if lradj in steps:
        return base if epoch < steps[lradj] else base * 0.1
    return None


class EarlyStopping:
    """Stop after `patience` epochs without improvement; keep the best state.

    An equal validation loss counts as an improvement, as the official `utils/tools.py`
    (`score < best_score + delta` with `delta = 0` is the only non-improving case).
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: float = math.inf
        self.best_epoch = 0
        self.counter = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def step(self, val_loss: float, model: nn.Module, epoch: int) -> bool:
        """Record `val_loss`; return True when this epoch improved on the best."""
        if val_loss <= self.best or self.best_state is None:
            self.best, self.best_epoch, self.counter = val_loss, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.counter += 1
        return False

    @property
    def stop(self) -> bool:
        """Whether patience is exhausted."""
        return self.counter >= self.patience


def make_loader(ds: WindowDataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
    """DataLoader over a window dataset (batched gather); drop_last only when a full batch exists."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last and len(ds) >= batch_size, collate_fn=collate_batch)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available (as the official `--use_gpu`), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LTSFError(f"--device {name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LTSFError("--device cuda requested but no CUDA device is available; use --device cpu")
    return device


def _forward(model: nn.Module, x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Model output for a batch on the model's device (CycleNet also gets the phases)."""
    device = next(model.parameters()).device
    x = x.to(device, non_blocking=True)
    if getattr(model, "needs_phase", False):
        return model(x, phase.to(device, non_blocking=True))
    return model(x)


def _select(out: torch.Tensor, target_only: bool) -> torch.Tensor:
    """Keep the last channel in MS mode (`f_dim = -1`), everything otherwise."""
    return out[..., -1:] if target_only else out


@torch.no_grad()
def loader_loss(model: nn.Module, loader: DataLoader, criterion: Callable, target_only: bool = False) -> float:
    """Mean over batches of the batch loss (the official `vali`)."""
    model.eval()
    losses = [criterion(_select(_forward(model, x, p), target_only).cpu(),
                        _select(y, target_only)).item() for x, y, p in loader]
    model.train()
    return float(np.mean(losses)) if losses else math.nan


@torch.no_grad()
def predict_windows(model: nn.Module, ds: WindowDataset, batch_size: int = 256,
                    target_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and targets for every window of `ds` in order, each `(N, pred_len, C')`."""
    model.eval()
    preds, trues = [], []
    for x, y, p in make_loader(ds, batch_size, shuffle=False, drop_last=False):
        preds.append(_select(_forward(model, x, p), target_only).cpu().numpy())
        trues.append(_select(y, target_only).numpy())
    return np.concatenate(preds), np.concatenate(trues)


def metrics(pred: np.ndarray, true: np.ndarray, scaler: StandardScaler | None = None) -> dict[str, float]:
    """Forecast errors over all windows, horizons and channels (float64 accumulation).

    On the scaled values (the benchmark convention): MSE, MAE, RMSE, RSE as the official
    `utils/metrics.py`, and CORR as the mean over channels of the Pearson correlation between
    forecast and truth over all windows and steps (the official CORR is not a correlation: its
    denominator is `sqrt(sum(a^2 b^2))` instead of `sqrt(sum(a^2) sum(b^2))`, scaled by 0.01).
    With `scaler`, MAPE and MSPE on the original units (on scaled values, near 0 by
    construction, they explode), over the entries whose truth is not 0 (the official ones divide
    by 0 there), plus MSE/MAE in the original units.
    """
    p, t = pred.astype(np.float64), true.astype(np.float64)
    err = p - t
    mse = float(np.mean(err ** 2))
    out = {"mse": mse, "mae": float(np.mean(np.abs(err))), "rmse": math.sqrt(mse),
           "rse": float(np.sqrt(np.sum(err ** 2)) / np.sqrt(np.sum((t - t.mean()) ** 2)))}
    pc = p.reshape(-1, p.shape[-1]) - p.reshape(-1, p.shape[-1]).mean(0)
    tc = t.reshape(-1, t.shape[-1]) - t.reshape(-1, t.shape[-1]).mean(0)
    denom = np.sqrt((pc ** 2).sum(0) * (tc ** 2).sum(0))
    corr = np.where(denom > 0, (pc * tc).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)
    out["corr"] = float(np.nanmean(corr)) if np.isfinite(corr).any() else math.nan
    if scaler is not None:
        mean, scale = scaler.mean, scaler.scale
        if p.shape[-1] != len(mean):  # MS: only the target (last) channel is forecast
            mean, scale = mean[-1:], scale[-1:]
        po, to = p * scale + mean, t * scale + mean
        nz = to != 0
        rel = (po[nz] - to[nz]) / to[nz]
        out.update(mse_orig=float(np.mean((po - to) ** 2)), mae_orig=float(np.mean(np.abs(po - to))),
                   mape=float(np.mean(np.abs(rel))) if rel.size else math.nan,
                   mspe=float(np.mean(rel ** 2)) if rel.size else math.nan,
                   mape_excluded=int((~nz).sum()))
    return out


def train_model(model: nn.Module, data: ForecastData, cfg: RunConfig,
                checkpoint: Path | None = None, progress: bool = True,
                resume: Path | None = None) -> dict[str, Any]:
    """Train `model` in place on `data.train` with early stopping on `data.val`; load the best state.

    With `resume` (a run folder), the full training state (weights, optimizer, schedule, early
    stopping, RNG) is saved there after every epoch as safetensors + JSON (no pickle) and an interrupted run of the same configuration continues
    from it, giving the same result as an uninterrupted run.
    Returns the per-epoch history, the epochs run, the best epoch and timings.
    """
    criterion = nn.MSELoss() if cfg.effective_loss == "mse" else nn.L1Loss()
    device = resolve_device(cfg.device)
    model.to(device)
    train_loader = make_loader(data.train, cfg.batch_size, shuffle=True, drop_last=True)
    val_loader = make_loader(data.val, cfg.batch_size, shuffle=True, drop_last=True)
    test_loader = make_loader(data.test, cfg.batch_size, shuffle=False, drop_last=False)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    scheduler = None
    if cfg.lradj == "TST" or cfg.onecycle_init:
        # The official loop builds this scheduler for every --lradj. Building it already sets the
        # rate to learning_rate / 25 (kept for epoch 1 unless TST steps it) and Adam's beta1 to
        # 0.95 (kept for the whole run, since only the rate is changed afterwards).
        onecycle = torch.optim.lr_scheduler.OneCycleLR(
            optim, max_lr=cfg.learning_rate, epochs=cfg.train_epochs,
            steps_per_epoch=len(train_loader), pct_start=cfg.pct_start)
        scheduler = onecycle if cfg.lradj == "TST" else None
    stopper = EarlyStopping(cfg.patience)
    history: list[dict[str, float]] = []
    train_time = 0.0
    start = 1
    saved = load_resume(resume, cfg) if resume is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        stopper.__dict__.update(saved["stopper"])
        history, train_time, start = saved["history"], saved["train_time"], saved["epoch"] + 1
        restore_rng(saved)
        log.info("%s resumed after epoch %d", cfg.setting, saved["epoch"])
    bar = tqdm(range(start, cfg.train_epochs + 1), desc=cfg.setting, disable=not progress,
               unit="epoch", dynamic_ncols=True, initial=start - 1, total=cfg.train_epochs)
    model.train()
    for epoch in bar:
        lr = optim.param_groups[0]["lr"]
        t0 = time.perf_counter()
        losses = []
        for x, y, p in tqdm(train_loader, leave=False, disable=not progress, desc=f"epoch {epoch}"):
            optim.zero_grad()
            loss = criterion(_select(_forward(model, x, p), data.target_only),
                             _select(y, data.target_only).to(device, non_blocking=True))
            loss.backward()
            optim.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        val_loss = loader_loss(model, val_loader, criterion, data.target_only)
        test_loss = (loader_loss(model, test_loader, criterion, data.target_only)
                     if cfg.test_each_epoch else math.nan)
        if not math.isfinite(val_loss):
            raise LTSFError(f"validation loss became {val_loss} at epoch {epoch}; "
                            "lower --learning_rate")
        improved = stopper.step(val_loss, model, epoch)
        if improved and checkpoint is not None:
            save_weights(checkpoint, stopper.best_state, metadata={"setting": cfg.setting,
                                                                  "epoch": str(epoch)})
        row = {"epoch": epoch, "lr": lr, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
               "test_loss": test_loss, "epoch_time_s": epoch_time}
        history.append(row)
        log.info("%s epoch %d lr %.3g train %.5f val %.5f test %.5f (%.1fs)%s", cfg.setting, epoch,
                 lr, row["train_loss"], val_loss, test_loss, epoch_time, " *" if improved else "")
        bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{val_loss:.4f}",
                        best=stopper.best_epoch)
        if stopper.stop:
            break
        if scheduler is None:
            new_lr = lr_after_epoch(epoch, cfg.lradj, cfg.learning_rate)
            if new_lr is not None:
                _set_lr(optim, new_lr)
        if resume is not None:
            save_resume(resume, cfg=cfg, epoch=epoch, model=model, optim=optim,
                        scheduler=scheduler, stopper=stopper, history=history,
                        train_time=train_time)
    bar.close()
    model.load_state_dict(stopper.best_state)
    return {"history": history, "epochs_run": len(history), "best_epoch": stopper.best_epoch,
            "best_val_loss": stopper.best, "train_time_s": train_time,
            "time_per_epoch_s": train_time / max(len(history), 1), "resumed_after_epoch": start - 1}


def _set_lr(optim: torch.optim.Optimizer, lr: float) -> None:
    for group in optim.param_groups:
        group["lr"] = lr


def run_dir(cfg: RunConfig) -> Path:
    """Folder of one run: `<checkpoints>/<setting>`."""
    return Path(cfg.checkpoints) / cfg.setting


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run one benchmark experiment end to end and write `results.json` + the best checkpoint.

    The folder records the settings and the data's hash (`settings.json`). A finished run with
    the same settings and data is not repeated (its results are returned with `cached: true`);
    an interrupted one continues from its last finished epoch; a folder holding other settings
    or data is an error naming them, unless `overwrite` (then it trains again from scratch).
    """
    cfg.validate()
    out_dir = run_dir(cfg)
    results_path = out_dir / RESULTS
    data_file = resolve_data_file(cfg.data, cfg.data_path, cfg.root_path)
    record = settings_record(cfg, data_file)
    previous = _read_results(results_path) if results_path.is_file() else None
    if overwrite:
        clear_resume(out_dir)
        for name in (RESULTS, CHECKPOINT):
            (out_dir / name).unlink(missing_ok=True)
    else:
        check_run_folder(out_dir, record, cfg, (previous or {}).get("config"))
        if previous is not None:
            previous["cached"] = True
            return previous
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    data = load_benchmark(cfg.data, cfg.data_path, cfg.root_path, cfg.seq_len, cfg.pred_len,
                          cycle=cfg.cycle, features=cfg.features, target=cfg.target)
    seed_everything(cfg.random_seed)
    model = build_model(cfg, data.n_channels)
    n_params = count_parameters(model)
    write_json(out_dir / SETTINGS, record)
    fit = train_model(model, data, cfg, checkpoint=out_dir / CHECKPOINT, progress=progress,
                      resume=out_dir)
    pred, true = predict_windows(model, data.test, cfg.batch_size, data.target_only)
    scores = metrics(pred, true, data.scaler)
    result = {
        "setting": cfg.setting, "model": cfg.model, "data": cfg.data,
        "data_file": Path(str(data.info["path"])).name,
        "model_type": cfg.model_type if cfg.model == "CycleNet" else None,
        "seq_len": cfg.seq_len, "pred_len": cfg.pred_len, "random_seed": cfg.random_seed,
        **scores, "params": n_params,
        "epochs_run": fit["epochs_run"], "best_epoch": fit["best_epoch"],
        "best_val_loss": fit["best_val_loss"], "train_time_s": fit["train_time_s"],
        "time_per_epoch_s": fit["time_per_epoch_s"],
        "wall_time_s": time.perf_counter() - t_start, "resumed_after_epoch": fit["resumed_after_epoch"],
        "channels": data.n_channels,
        "windows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": CHECKPOINT, "settings_hash": record["hash"], "config": cfg.to_dict(),
        "scaler": data.scaler.to_dict(), "history": fit["history"],
    }
    write_json(results_path, result)
    clear_resume(out_dir)
    return result


def _read_results(path: Path) -> dict[str, Any] | None:
    """A run's `results.json`, or None when it is damaged (the run is then redone)."""
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is damaged; the run is redone", path)
        return None
    return out if isinstance(out, dict) and "mse" in out else None


def load_run_model(run_path: str | Path) -> tuple[nn.Module, RunConfig]:
    """Rebuild a trained model from a run folder (its `results.json` and best checkpoint)."""
    run_path = Path(run_path)
    results = run_path / RESULTS
    if not results.is_file():
        raise LTSFError(f"{run_path} holds no {RESULTS}; pass a folder written by `ltsf train`")
    info = read_json(results, "run results")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise LTSFError(f"{results} has no 'config'; it is not an `ltsf train` results.json")
    cfg = RunConfig.from_dict(info["config"])
    state = load_weights(run_path / CHECKPOINT)
    enc_in = cfg.enc_in or info.get("channels") or _channels_from_state(state)
    model = build_model(cfg, enc_in)
    model.load_state_dict(state)
    return model, cfg


def _channels_from_state(state: dict[str, torch.Tensor]) -> int:
    if "cycleQueue.data" in state:
        return int(state["cycleQueue.data"].shape[1])
    if "channel_emb" in state:
        return int(state["channel_emb"].shape[0])
    raise LTSFError("cannot tell the channel count of this checkpoint; it needs --enc_in in its config")
