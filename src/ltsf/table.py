"""Gather `results.json` files into a markdown table (mean ± std over seeds, published numbers beside)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import LTSFError
from .io import read_json

#: Published look-back-96 numbers restated in the project spec (ETTh1 only; CycleNet: mean of the
#: five seeds of the official result file; SegRNN: repository README after the drop_last fix).
PUBLISHED: dict[tuple[str, str, int], tuple[float, float]] = {
    ("CycleNet/Linear", "ETTh1", 96): (0.3785, 0.3915),
    ("CycleNet/Linear", "ETTh1", 192): (0.4266, 0.4195),
    ("CycleNet/Linear", "ETTh1", 336): (0.4642, 0.4393),
    ("CycleNet/Linear", "ETTh1", 720): (0.4619, 0.4609),
    ("CycleNet/MLP", "ETTh1", 96): (0.3752, 0.3953),
    ("CycleNet/MLP", "ETTh1", 192): (0.4367, 0.4280),
    ("CycleNet/MLP", "ETTh1", 336): (0.4968, 0.4553),
    ("CycleNet/MLP", "ETTh1", 720): (0.5205, 0.4842),
    ("SegRNN", "ETTh1", 96): (0.368, 0.395),
    ("SegRNN", "ETTh1", 192): (0.408, 0.419),
    ("SegRNN", "ETTh1", 336): (0.444, 0.440),
    ("SegRNN", "ETTh1", 720): (0.446, 0.457),
}


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """`results.json` files given directly or found under the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
        else:
            raise LTSFError(f"{p} does not exist; pass results.json files or folders holding them")
    if not found:
        raise LTSFError("no results.json found under the given paths; run `ltsf train` first")
    return found


def model_label(r: dict[str, Any]) -> str:
    """Display name: CycleNet/Linear, CycleNet/MLP, SegRNN, Linear."""
    if r["model"] == "CycleNet":
        return "CycleNet/" + ("Linear" if r.get("model_type") == "linear" else "MLP")
    return str(r["model"])


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read all result files."""
    out = []
    for f in find_results(paths):
        r = read_json(f, "results file")
        missing = [k for k in ("model", "data", "seq_len", "pred_len", "mse", "mae", "random_seed")
                   if not isinstance(r, dict) or k not in r]
        if missing:
            raise LTSFError(f"{f} lacks {', '.join(missing)}; it is not an `ltsf train` results.json")
        out.append(r)
    return out


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def _fmt(xs: Sequence[float]) -> str:
    m, s = _mean_std(xs)
    return f"{m:.4f}" if len(xs) == 1 else f"{m:.4f} ± {s:.4f}"


def markdown_table(results: list[dict[str, Any]], published: bool = True) -> str:
    """One row per (data, model, horizon): ours (mean ± std over seeds), published, gap, cost."""
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(Path(r.get("data_file", r["data"])).stem, model_label(r), r["seq_len"], r["pred_len"])].append(r)
    head = ["data", "model", "L", "H", "seeds", "MSE", "MAE"]
    if published:
        head += ["pub. MSE", "pub. MAE", "ΔMSE"]
    head += ["params", "epochs", "s/epoch", "wall s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3])):
        rs = groups[key]
        data, label, seq_len, pred_len = key
        mse = [r["mse"] for r in rs]
        row = [data, label, str(seq_len), str(pred_len),
               ",".join(str(r["random_seed"]) for r in sorted(rs, key=lambda r: r["random_seed"])),
               _fmt(mse), _fmt([r["mae"] for r in rs])]
        if published:
            pub = PUBLISHED.get((label, data, pred_len)) if seq_len == 96 else None
            if pub:
                gap = 100.0 * (_mean_std(mse)[0] - pub[0]) / pub[0]
                row += [f"{pub[0]:.4f}", f"{pub[1]:.4f}", f"{gap:+.1f} %"]
            else:
                row += ["–", "–", "–"]
        row += [str(rs[0]["params"]),
                f"{_mean_std([r['epochs_run'] for r in rs])[0]:.1f}",
                f"{_mean_std([r['time_per_epoch_s'] for r in rs])[0]:.2f}",
                f"{_mean_std([r['wall_time_s'] for r in rs])[0]:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
