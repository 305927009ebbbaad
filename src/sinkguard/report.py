"""Plots and tables: sink-divergence heatmaps, HS/FA tables and curves."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def plot_sink_heatmap(divergence: torch.Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """Save a per-(layer, head) heatmap of the sink divergence (red: harmful > harmless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = divergence.detach().float().cpu().numpy()
    bound = float(abs(data).max()) or 1.0
    n_layers, n_heads = data.shape
    fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * n_heads + 2), max(3.0, 0.22 * n_layers + 1.5)))
    im = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    positive = int((divergence > 0).sum())
    ax.set_title(title or f"sink divergence (harmful - harmless): {positive}/{data.size} heads > 0",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="attention on sink: harmful - harmless")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}"


def _defense(r: dict) -> str:
    """The fine-tuning defense, with the post-fine-tuning one after a '+' when there is one."""
    return r["defense"] + (f" + {r['post']}" if r.get("post", "none") != "none" else "")


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("alignment", "-"), r["task"], _defense(r), r["poison_ratio"]), []).append(r)
    return groups


def results_table(results: dict) -> str:
    """Markdown table: HS per prompt set, refusal rate, FA and positive heads, mean ± std over seeds."""
    records = results["records"]
    hs_keys = sorted({k for r in records for k in r if k.startswith("hs_") and not k.endswith("_n")})
    header = ["alignment", "task", "defense", "p"] + [f"HS {k[3:]} (%)" for k in hs_keys] + \
             [f"refusal {k[3:]} (%)" for k in hs_keys] + ["FA (%)", "positive heads", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (aligner, task, defense, p), rows in _groups(records).items():
        cells = [aligner, task, defense, "-" if p is None else f"{p:g}"]
        cells += [_mean_std([r.get(k) for r in rows]) for k in hs_keys]
        cells += [_mean_std([r.get("refusal_" + k[3:]) for r in rows]) for k in hs_keys]
        cells += [_mean_std([r.get("fa") for r in rows]),
                  _mean_std([r.get("positive_heads") for r in rows]), str(len(rows))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_times(run_dir: str | os.PathLike) -> str:
    """Markdown table of every finished stage's own wall time (from its train_log.json / eval.json)."""
    import functools
    import json

    @functools.cache
    def info(folder: Path) -> dict:
        for name in ("train_log.json", "eval.json"):
            if (folder / name).is_file():
                return json.loads((folder / name).read_text())
        return {}

    def label(folder: Path) -> str:
        """Stage name without its hash, followed by the stage whose model it started from."""
        model = Path(str(info(folder).get("model", "")))
        source = label(model.parent) if model.parent.parent.name == "stages" else ""
        if folder.name.startswith("eval-"):
            return f"eval of {source or model}"
        return folder.name.rsplit("-", 1)[0] + (f" (from {source})" if source else "")

    order = {"align": 0, "ft": 1}
    rows = sorted((order.get(f.name.split("-")[0], 2), label(f), info(f)["wall_s"])
                  for f in Path(run_dir, "stages").glob("*") if info(f).get("wall_s") is not None)
    lines = [f"| {name} | {wall / 60:.1f} |" for _, name, wall in rows]
    return "\n".join(["| stage | wall (min) |", "|---|---|", *lines]) if lines else ""


def plot_versus_ratio(results: dict, metric: str, path: str | os.PathLike, ylabel: str) -> Path:
    """Line plot of `metric` against the poison ratio, one line per defense (and task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series: dict[tuple, dict[float, list[float]]] = {}
    flat: dict[tuple, list[float]] = {}
    for r in results["records"]:
        if r.get(metric) is None:
            continue
        name = _defense(r) if r.get("alignment") in (None, "none") else f"{r['alignment']} + {_defense(r)}"
        if r["poison_ratio"] is None:
            flat.setdefault((r["task"], name), []).append(r[metric])
        else:
            series.setdefault((r["task"], name), {}).setdefault(r["poison_ratio"], []).append(r[metric])
    for (task, name), points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=f"{name} ({task})")
    for (task, name), values in sorted(flat.items()):
        ax.axhline(sum(values) / len(values), linestyle="--", linewidth=1, color="gray" if name == "base" else "k",
                   label=f"{name} model ({task})")
    ax.set_xlabel("poison ratio p")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(run_dir: str | os.PathLike) -> Path:
    """`RUN_DIR/report.md` with the results table and HS/FA/positive-head plots beside it."""
    import json

    from .errors import SinkguardError

    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise SinkguardError(f"{path} not found: run `sinkguard run CONFIG` first (or point to its run dir)")
    results = json.loads(path.read_text())
    hs_keys = sorted({k for r in results["records"] for k in r if k.startswith("hs_") and not k.endswith("_n")})
    plots = []
    for key in hs_keys:
        plots.append(plot_versus_ratio(results, key, run_dir / f"{key}.png", f"harmful score {key[3:]} (%)"))
    for key, ylabel in (("fa", "fine-tune accuracy (%)"), ("positive_heads", "heads with positive sink divergence")):
        if any(r.get(key) is not None for r in results["records"]):  # e.g. no sink analysis configured
            plots.append(plot_versus_ratio(results, key, run_dir / f"{key}.png", ylabel))
    timing = ", ".join(f"{k} {v / 60:.1f} min" for k, v in results.get("stage_wall_s", {}).items())  # cached stages: 0
    stages = stage_times(run_dir)
    text = "\n\n".join([
        f"# {results['name']}: {results['model']}",
        "HS: % of answers the judge flags on harmful prompts (lower is better); refusal: keyword "
        "refusal rate; FA: fine-tune accuracy on the task's test rows; positive heads: (layer, head) "
        "pairs whose sink divergence is > 0. p '-' rows are the models before fine-tuning.",
        results_table(results),
        f"Wall time per stage in the last invocation (cached stages count 0): {timing}." if timing else "",
        f"Wall time of each stage when it ran:\n\n{stages}" if stages else "",
        "\n".join(f"![{p.stem}]({p.name})" for p in plots),
    ])
    out = run_dir / "report.md"
    tmp = out.with_name(".report.md.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
