"""Run-folder bookkeeping without pickle: the resume state (safetensors + JSON) and the settings record.

The resume state holds every tensor (weights, best weights, Adam moments, torch RNG states) in
`resume.safetensors` and everything else (schedule, early-stopping counters, history, Python
and NumPy RNG states) in `resume.json`; both carry the epoch so that a pair torn by a crash
between the two writes is detected and ignored. `settings.json` records the settings and a
content hash of the input data that produced a run folder, so a rerun with other settings or
changed data is refused instead of silently reusing or replacing the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RUNTIME_FIELDS, RunConfig
from .errors import LTSFError
from .io import load_weights, save_weights, write_json

log = logging.getLogger(__name__)

RESUME_WEIGHTS = "resume.safetensors"
RESUME_STATE = "resume.json"
SETTINGS = "settings.json"


# ----------------------------------------------------------------------------- settings record
def compared_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a config dict that determine a run's result (runtime-only fields dropped)."""
    return {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}


def file_digest(path: str | Path) -> dict[str, Any]:
    """Name, size and SHA-256 of an input file (fast: the benchmark files are a few MB)."""
    path = Path(path)
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"file": path.name, "size": path.stat().st_size, "sha256": h.hexdigest()}


def settings_record(cfg: RunConfig, data_file: str | Path) -> dict[str, Any]:
    """What `settings.json` holds: the settings, the data digest and one hash over both."""
    record = {"settings": compared_settings(cfg.to_dict()), "data": file_digest(data_file)}
    blob = json.dumps(record, sort_keys=True, default=str).encode()
    record["hash"] = hashlib.sha256(blob).hexdigest()[:16]
    return record


def settings_diff(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """`key: old -> new` for every result-relevant setting that differs from a stored config.

    Keys missing from `stored` (fields added since it was written) count as their default.
    """
    current = compared_settings(cfg.to_dict())
    defaults = {f.name: f.default for f in fields(RunConfig)}
    out = []
    for key, value in current.items():
        old = stored.get(key, defaults.get(key))
        if old != value:
            out.append(f"{key}: {old!r} -> {value!r}")
    return out


def check_run_folder(out_dir: Path, record: dict[str, Any], cfg: RunConfig,
                     legacy_config: dict[str, Any] | None) -> None:
    """Refuse to reuse `out_dir` for other settings or changed data (`LTSFError` naming them).

    `legacy_config` is the config in a `results.json` written before settings records existed.
    """
    path = out_dir / SETTINGS
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            stored_settings, stored_data = stored["settings"], stored["data"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise LTSFError(f"{path} is damaged; pass --overwrite to retrain this run") from None
        if stored.get("hash") == record["hash"]:
            return
        diff = settings_diff(stored_settings, cfg)
        if stored_data != record["data"]:
            diff.append(f"data file {record['data']['file']}: sha256 {stored_data.get('sha256', '?')[:12]} "
                        f"-> {record['data']['sha256'][:12]}")
    elif legacy_config is not None:
        diff = settings_diff(legacy_config, cfg)
    else:
        return
    if diff:
        raise LTSFError(f"{out_dir} holds a run with other settings ({'; '.join(diff)}); pass "
                        "--overwrite to retrain it there, or change --checkpoints/--tag")


# --------------------------------------------------------------------------------- resume state
def _split_optim(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        rest["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                rest["state"][str(pid)][name] = value
    return tensors, rest


def _join_optim(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in rest["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, {"python": [version, list(mt), gauss],
                     "numpy": [name, int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    version, mt, gauss = rest["python"]
    random.setstate((version, tuple(mt), gauss))
    name, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                        key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_resume(out_dir: Path, *, cfg: RunConfig, epoch: int, model: torch.nn.Module,
                optim: torch.optim.Optimizer, scheduler: Any, stopper: Any,
                history: list[dict[str, float]], train_time: float) -> None:
    """Write the full training state after `epoch` (tensors first, then the JSON that names the epoch)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if stopper.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in stopper.best_state.items()})
    optim_tensors, optim_rest = _split_optim(optim.state_dict())
    rng_tensors, rng_rest = _rng_state()
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    save_weights(out_dir / RESUME_WEIGHTS, tensors, metadata={"epoch": str(epoch)})
    write_json(out_dir / RESUME_STATE, {
        "config": cfg.to_dict(), "epoch": epoch, "optim": optim_rest,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "stopper": {"best": stopper.best, "best_epoch": stopper.best_epoch,
                    "counter": stopper.counter, "patience": stopper.patience},
        "history": history, "train_time": train_time, "rng": rng_rest})


def load_resume(out_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The state saved by `save_resume` for this configuration, or None (nothing, torn or foreign)."""
    wpath, jpath = out_dir / RESUME_WEIGHTS, out_dir / RESUME_STATE
    if not (wpath.is_file() and jpath.is_file()):
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(wpath), framework="pt") as fh:
            tensor_epoch = (fh.metadata() or {}).get("epoch")
        state = json.loads(jpath.read_text(encoding="utf-8"))
        tensors = load_weights(wpath)
    except Exception as err:  # a damaged file only costs the epochs it held
        log.warning("cannot read the resume state in %s (%s); training starts from epoch 1", out_dir, err)
        return None
    if str(state.get("epoch")) != tensor_epoch:
        log.warning("%s: resume files are from different epochs; training starts from epoch 1", out_dir)
        return None
    if settings_diff(state.get("config") or {}, cfg):
        log.warning("%s: resume state belongs to other settings; training starts from epoch 1", out_dir)
        return None
    state["model"] = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    state["stopper"]["best_state"] = best or None
    state["optim"] = _join_optim(tensors, state["optim"])
    state["rng_tensors"] = tensors
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put the RNGs back where `save_resume` found them."""
    _set_rng_state(state["rng_tensors"], state["rng"])


def clear_resume(out_dir: Path) -> None:
    """Delete the resume files (after a finished run, or before `--overwrite`)."""
    for name in (RESUME_WEIGHTS, RESUME_STATE, "resume.pt"):
        (out_dir / name).unlink(missing_ok=True)
