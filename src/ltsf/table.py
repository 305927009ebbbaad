"""Gather `results.json` files into a markdown table (mean ± std over seeds, published numbers beside)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import LTSFError
from .io import read_json

#: Reference sources (short tags shown in the table's `ref.` column; see docs/ltsf_results.md).
CN = "CN"  # ACAT-SCUT/CycleNet result.txt: mean of the five seeds 2024-2028 of the official scripts
SEG_README = "SR"  # lss-1138/SegRNN README, look-back-96 table (after the drop_last fix)
SEG_PAPER = "SP"  # SegRNN paper Table II (look-back 720; before the drop_last fix)
ITRANS = "iT"  # iTransformer paper's DLinear row, as quoted in the SegRNN README (its own settings)

#: Published (MSE, MAE, source) keyed by (model label, data, look-back, horizon).
PUBLISHED: dict[tuple[str, str, int, int], tuple[float, float, str]] = {
    ("CycleNet/Linear", "ETTh1", 96, 96): (0.3785, 0.3915, CN),
    ("CycleNet/MLP", "ETTh1", 96, 96): (0.3752, 0.3953, CN),
    ("CycleNet/Linear", "ETTh1", 96, 192): (0.4266, 0.4195, CN),
    ("CycleNet/MLP", "ETTh1", 96, 192): (0.4367, 0.4280, CN),
    ("CycleNet/Linear", "ETTh1", 96, 336): (0.4642, 0.4393, CN),
    ("CycleNet/MLP", "ETTh1", 96, 336): (0.4968, 0.4553, CN),
    ("CycleNet/Linear", "ETTh1", 96, 720): (0.4619, 0.4609, CN),
    ("CycleNet/MLP", "ETTh1", 96, 720): (0.5205, 0.4842, CN),
    ("CycleNet/Linear", "ETTh1", 336, 96): (0.3745, 0.3965, CN),
    ("CycleNet/MLP", "ETTh1", 336, 96): (0.3827, 0.4034, CN),
    ("CycleNet/Linear", "ETTh1", 336, 192): (0.4067, 0.4153, CN),
    ("CycleNet/MLP", "ETTh1", 336, 192): (0.4211, 0.4261, CN),
    ("CycleNet/Linear", "ETTh1", 336, 336): (0.4314, 0.4309, CN),
    ("CycleNet/MLP", "ETTh1", 336, 336): (0.4493, 0.4443, CN),
    ("CycleNet/Linear", "ETTh1", 336, 720): (0.4509, 0.4642, CN),
    ("CycleNet/MLP", "ETTh1", 336, 720): (0.4975, 0.4860, CN),
    ("CycleNet/Linear", "ETTh1", 720, 96): (0.3794, 0.4032, CN),
    ("CycleNet/MLP", "ETTh1", 720, 96): (0.3854, 0.4129, CN),
    ("CycleNet/Linear", "ETTh1", 720, 192): (0.4161, 0.4257, CN),
    ("CycleNet/MLP", "ETTh1", 720, 192): (0.4249, 0.4383, CN),
    ("CycleNet/Linear", "ETTh1", 720, 336): (0.4473, 0.4451, CN),
    ("CycleNet/MLP", "ETTh1", 720, 336): (0.4610, 0.4633, CN),
    ("CycleNet/Linear", "ETTh1", 720, 720): (0.4778, 0.4835, CN),
    ("CycleNet/MLP", "ETTh1", 720, 720): (0.4870, 0.4872, CN),
    ("CycleNet/Linear", "ETTh2", 96, 96): (0.2859, 0.3353, CN),
    ("CycleNet/MLP", "ETTh2", 96, 96): (0.2981, 0.3449, CN),
    ("CycleNet/Linear", "ETTh2", 96, 192): (0.3730, 0.3917, CN),
    ("CycleNet/MLP", "ETTh2", 96, 192): (0.3726, 0.3962, CN),
    ("CycleNet/Linear", "ETTh2", 96, 336): (0.4218, 0.4332, CN),
    ("CycleNet/MLP", "ETTh2", 96, 336): (0.4313, 0.4395, CN),
    ("CycleNet/Linear", "ETTh2", 96, 720): (0.4540, 0.4583, CN),
    ("CycleNet/MLP", "ETTh2", 96, 720): (0.4510, 0.4585, CN),
    ("CycleNet/Linear", "ETTh2", 336, 96): (0.2799, 0.3417, CN),
    ("CycleNet/MLP", "ETTh2", 336, 96): (0.3003, 0.3554, CN),
    ("CycleNet/Linear", "ETTh2", 336, 192): (0.3424, 0.3856, CN),
    ("CycleNet/MLP", "ETTh2", 336, 192): (0.3739, 0.4033, CN),
    ("CycleNet/Linear", "ETTh2", 336, 336): (0.3715, 0.4131, CN),
    ("CycleNet/MLP", "ETTh2", 336, 336): (0.3847, 0.4194, CN),
    ("CycleNet/Linear", "ETTh2", 336, 720): (0.4263, 0.4517, CN),
    ("CycleNet/MLP", "ETTh2", 336, 720): (0.4287, 0.4508, CN),
    ("CycleNet/Linear", "ETTh2", 720, 96): (0.2719, 0.3377, CN),
    ("CycleNet/MLP", "ETTh2", 720, 96): (0.2937, 0.3527, CN),
    ("CycleNet/Linear", "ETTh2", 720, 192): (0.3328, 0.3803, CN),
    ("CycleNet/MLP", "ETTh2", 720, 192): (0.3600, 0.3956, CN),
    ("CycleNet/Linear", "ETTh2", 720, 336): (0.3629, 0.4087, CN),
    ("CycleNet/MLP", "ETTh2", 720, 336): (0.3924, 0.4239, CN),
    ("CycleNet/Linear", "ETTh2", 720, 720): (0.4156, 0.4493, CN),
    ("CycleNet/MLP", "ETTh2", 720, 720): (0.4254, 0.4514, CN),
    ("SegRNN", "ETTh1", 96, 96): (0.368, 0.395, SEG_README),
    ("SegRNN", "ETTh1", 96, 192): (0.408, 0.419, SEG_README),
    ("SegRNN", "ETTh1", 96, 336): (0.444, 0.44, SEG_README),
    ("SegRNN", "ETTh1", 96, 720): (0.446, 0.457, SEG_README),
    ("SegRNN", "ETTh2", 96, 96): (0.278, 0.335, SEG_README),
    ("SegRNN", "ETTh2", 96, 192): (0.359, 0.389, SEG_README),
    ("SegRNN", "ETTh2", 96, 336): (0.421, 0.436, SEG_README),
    ("SegRNN", "ETTh2", 96, 720): (0.432, 0.455, SEG_README),
    ("SegRNN", "ETTh1", 720, 96): (0.351, 0.392, SEG_PAPER),
    ("SegRNN", "ETTh1", 720, 192): (0.392, 0.414, SEG_PAPER),
    ("SegRNN", "ETTh1", 720, 336): (0.423, 0.433, SEG_PAPER),
    ("SegRNN", "ETTh1", 720, 720): (0.466, 0.472, SEG_PAPER),
    ("SegRNN", "ETTh2", 720, 96): (0.276, 0.335, SEG_PAPER),
    ("SegRNN", "ETTh2", 720, 192): (0.341, 0.389, SEG_PAPER),
    ("SegRNN", "ETTh2", 720, 336): (0.364, 0.403, SEG_PAPER),
    ("SegRNN", "ETTh2", 720, 720): (0.403, 0.448, SEG_PAPER),
    ("DLinear", "ETTh1", 96, 96): (0.386, 0.4, ITRANS),
    ("DLinear", "ETTh1", 96, 192): (0.437, 0.432, ITRANS),
    ("DLinear", "ETTh1", 96, 336): (0.481, 0.459, ITRANS),
    ("DLinear", "ETTh1", 96, 720): (0.519, 0.516, ITRANS),
    ("DLinear", "ETTh2", 96, 96): (0.333, 0.387, ITRANS),
    ("DLinear", "ETTh2", 96, 192): (0.477, 0.476, ITRANS),
    ("DLinear", "ETTh2", 96, 336): (0.594, 0.541, ITRANS),
    ("DLinear", "ETTh2", 96, 720): (0.831, 0.657, ITRANS),
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
    """Display name: CycleNet/Linear, CycleNet/MLP, SegRNN, DLinear, RLinear / RMLP (Linear /
    MLP with instance norm), with `+RCF` for the plug-in."""
    if r["model"] == "CycleNet":
        return "CycleNet/" + ("Linear" if r.get("model_type") == "linear" else "MLP")
    cfg = r.get("config") or {}
    name = str(r["model"])
    if name in ("Linear", "MLP") and cfg.get("use_revin"):
        name = "R" + name
    return name + ("+RCF" if cfg.get("rcf") else "")


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
        head += ["pub. MSE", "pub. MAE", "ΔMSE", "ref."]
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
            pub = PUBLISHED.get((label, data, seq_len, pred_len))
            if pub:
                gap = 100.0 * (_mean_std(mse)[0] - pub[0]) / pub[0]
                row += [f"{pub[0]:.4f}", f"{pub[1]:.4f}", f"{gap:+.1f} %", pub[2]]
            else:
                row += ["–", "–", "–", "–"]
        row += [str(rs[0]["params"]),
                f"{_mean_std([r['epochs_run'] for r in rs])[0]:.1f}",
                f"{_mean_std([r['time_per_epoch_s'] for r in rs])[0]:.2f}",
                f"{_mean_std([r['wall_time_s'] for r in rs])[0]:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


#: (backbone, backbone + RCF) label pairs compared by `rcf_table`.
RCF_PAIRS = (("Linear", "Linear+RCF"), ("RLinear", "CycleNet/Linear"), ("RMLP", "CycleNet/MLP"),
             ("DLinear", "DLinear+RCF"), ("SegRNN", "SegRNN+RCF"), ("MLP", "MLP+RCF"))


def rcf_table(results: list[dict[str, Any]]) -> str:
    """RCF plug-in comparison: each backbone's MSE/MAE with and without the learned cycle."""
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(Path(r.get("data_file", r["data"])).stem, model_label(r), r["seq_len"], r["pred_len"])].append(r)
    head = ["data", "L", "H", "backbone", "seeds", "MSE", "MAE", "+RCF seeds", "+RCF MSE",
            "+RCF MAE", "ΔMSE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(d, sl, pl) for d, _, sl, pl in groups})
    for base, plus in RCF_PAIRS:
        for d, sl, pl in keys:
            a, b = groups.get((d, base, sl, pl)), groups.get((d, plus, sl, pl))
            if not a or not b:
                continue
            ma, mb = _mean_std([r["mse"] for r in a])[0], _mean_std([r["mse"] for r in b])[0]
            lines.append("| " + " | ".join([
                d, str(sl), str(pl), base, str(len(a)), _fmt([r["mse"] for r in a]),
                _fmt([r["mae"] for r in a]), str(len(b)), _fmt([r["mse"] for r in b]),
                _fmt([r["mae"] for r in b]), f"{100.0 * (mb - ma) / ma:+.1f} %"]) + " |")
    return "\n".join(lines) + "\n"
