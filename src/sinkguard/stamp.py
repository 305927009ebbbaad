"""Stage folders record what produced them, so a rerun never reuses or resumes a stale result.

`claim(out, settings, inputs)` writes `out/stage.json` (the settings and a fingerprint of the
input data and model) before a stage starts. Rerunning on the same folder with the same record
resumes or reuses it; with other settings or changed inputs it is an error naming the
differences, unless `overwrite` (then the stage's outputs are removed and it runs again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import SinkguardError
from .io import write_json

log = logging.getLogger(__name__)

STAMP_FILE = "stage.json"


def digest(obj: Any) -> str:
    """Short stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_fingerprint(name: str | os.PathLike) -> str:
    """A model or data path as its files' names, sizes and mtimes (a hub id or alias: the name itself)."""
    path = Path(name).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        return str(name)
    return digest([(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size,
                    p.stat().st_mtime_ns) for p in files])


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs (nested keys dotted)."""
    a, b = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def read(out: str | os.PathLike) -> dict | None:
    """The stage record in `out`, or None."""
    path = Path(out) / STAMP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def claim(out: str | os.PathLike, settings: dict, inputs: dict[str, str], outputs: tuple[str, ...],
          overwrite: bool = False) -> dict | None:
    """Record `settings` + `inputs` for the stage in `out`; return the record of a finished run to reuse.

    A folder holding any of `outputs` but no matching record is refused (or cleared with `overwrite`).
    A finished record whose first output (the model) is gone is stale, e.g. a study's results kept
    without their weights: the folder is cleared and the stage runs again. So is an unfinished record
    with none of `outputs` (a run stopped before its first checkpoint): nothing of it can be lost.
    """
    out = Path(out)
    record = {"settings": settings, "inputs": inputs}
    old = read(out)
    present = [name for name in outputs if (out / name).exists()]
    if old is not None and old.get("finished") and outputs[0] not in present:
        log.warning("%s: finished before, but its %s is gone: running the stage again", out, outputs[0])
        old, overwrite = None, True
    elif old is not None and not old.get("finished") and not present:
        old = None
    if old is not None and {"settings": old.get("settings"), "inputs": old.get("inputs")} == json.loads(
            json.dumps(record, default=str)):
        return old if old.get("finished") else None
    if old is not None or present:
        if not overwrite:
            if old is None:
                why = f"it holds {', '.join(present)} with no record of the settings that made them"
            else:
                diff = differences(old.get("settings", {}), settings)
                diff += [f"input {k} changed" for k in sorted(set(inputs) | set(old.get("inputs", {})))
                         if old.get("inputs", {}).get(k) != inputs.get(k)]
                why = "it was made with other settings: " + "; ".join(diff)
            raise SinkguardError(f"{out}: {why}; pass --overwrite to run the stage again there, or choose "
                                 "another output folder")
        for name in present:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    write_json(out / STAMP_FILE, record)
    return None


def finish(out: str | os.PathLike, **info: Any) -> None:
    """Mark the stage in `out` finished (its record gains `finished`), so a rerun reuses it."""
    record = read(out) or {}
    record["finished"] = info
    write_json(Path(out) / STAMP_FILE, record)
