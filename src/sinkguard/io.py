"""Atomic file writes (temp file in the same folder, then os.replace) for text, JSON, JSONL, figures,
and the readers of user-supplied text files.

Every sinkguard writer goes through here, so a crash or Ctrl-C never leaves half a file that a
rerun would mistake for a finished one; every reader turns a missing, non-UTF-8 or truncated file
into one `SinkguardError` naming the file (and line).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import SinkguardError


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


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file (`what` names it in errors); missing or not UTF-8 is a `SinkguardError`."""
    path = Path(path)
    if not path.is_file():
        raise SinkguardError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SinkguardError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 "
                             "or restore it") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """A JSON file; missing, not UTF-8 or not valid JSON (e.g. truncated) is a `SinkguardError`."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise SinkguardError(f"{what} {path} is not valid JSON (truncated? {exc.msg} at line {exc.lineno}); "
                             "restore or rewrite it") from None


def read_jsonl(path: str | os.PathLike, what: str = "file",
               check: Callable[[Any], str | None] | None = None) -> list[Any]:
    """The values of a JSON-lines file (blank lines skipped); errors name the file and line.

    `check(value)` says what is wrong with a row (None: nothing), e.g. a missing field.
    """
    rows = []
    for number, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SinkguardError(f"{what} {path} line {number} is not valid JSON (truncated? {exc.msg}); "
                                 "restore or rewrite it") from None
        problem = check(row) if check else None
        if problem:
            raise SinkguardError(f"{path} line {number}: {problem}")
        rows.append(row)
    return rows
