"""Atomic file writes (temp file in the same folder, then os.replace) for text, JSON and safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON atomically, so a crash never leaves half a file."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    _atomic(path, lambda tmp: tmp.write_text(text))


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save a state dict as safetensors atomically (tensors made contiguous CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict onto the CPU; a missing or damaged file is an `LTSFError`."""
    from .errors import LTSFError

    if not Path(path).is_file():
        raise LTSFError(f"weights file {path} not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise LTSFError(f"weights file {path} is damaged ({str(exc)[:120]}); rerun with --overwrite") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing, non-UTF-8 or truncated file is one clear `LTSFError`."""
    from .errors import LTSFError

    path = Path(path)
    if not path.is_file():
        raise LTSFError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LTSFError(f"{what} {path} is not UTF-8 text; restore or delete it") from None
    except json.JSONDecodeError as exc:
        raise LTSFError(f"{what} {path} is not valid JSON (truncated? {exc.msg} at line "
                        f"{exc.lineno}); restore, delete or rerun it") from None
