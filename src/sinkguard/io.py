"""Atomic file writes (temp file in the same folder, then os.replace) for text, JSON, JSONL, figures.

Every sinkguard writer goes through here, so a crash or Ctrl-C never leaves half a file that a
rerun would mistake for a finished one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path` (same suffix), then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    return atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (non-JSON values such as paths written as strings)."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Atomically replace `path` with `rows`, one JSON object a line."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """`fig.savefig` atomically (the temp file keeps the suffix, so matplotlib picks the format)."""
    return atomic(path, lambda tmp: fig.savefig(tmp, **kwargs))
