"""The sink-divergence hypothesis over training: positive heads and HS at every kept checkpoint.

Surgery's central finding is that heads with positive sink divergence multiply as a model becomes
harmful. `analyze_run` tests it on fine-tuning runs trained with `keep_checkpoints`: for the
starting model (step 0), every checkpoint and the final model it measures the full divergence
map on texts Surgery's pools never use (BeaverTails validation by default) and the HS of that
checkpoint's answers, then Spearman's rho between positive heads and HS with an interval that
resamples whole runs (checkpoints of one run are not independent).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path

from .errors import SinkguardError
from .io import save_figure, write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = ("finetuning", "poison_ratio", "seed", "step", "positive_heads", "hs", "mean_divergence")


def run_stages(run_dir: str | os.PathLike) -> list[Path]:
    """Training-stage folders of `run_dir` (itself, or its `stages/ft-*`) with kept checkpoints, or
    whose checkpoints were measured and dropped before (`analysis/<stage>/points.json`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SinkguardError(f"run folder {run_dir} does not exist")
    candidates = [run_dir] if (run_dir / "train_log.json").is_file() else sorted((run_dir / "stages").glob("ft-*"))
    stages = [s for s in candidates if (s / "train_log.json").is_file()
              and ((s / "checkpoints").is_dir() or (run_dir / "analysis" / s.name / "points.json").is_file())]
    if not stages:
        raise SinkguardError(
            f"{run_dir} holds no finished fine-tuning run with kept checkpoints: train with "
            "`sinkguard finetune --keep-checkpoints 8` (or the stage option keep_checkpoints: 8)"
        )
    return stages


def checkpoints(stage: Path) -> tuple[dict, list[tuple[int, str]]]:
    """(train log, [(step, model path)]): the starting model at step 0, each checkpoint, the final model."""
    info = json.loads((stage / "train_log.json").read_text(encoding="utf-8"))
    kept = sorted((int(p.name.split("-")[-1]), str(p)) for p in (stage / "checkpoints").glob("checkpoint-*"))
    steps = [(0, str(info["model"]))] + kept
    last = max((e.get("step", 0) for e in info.get("log_history", [])), default=0)
    if (stage / "model").is_dir() and last > (kept[-1][0] if kept else 0):
        steps.append((last, str(stage / "model")))
    return info, steps


def _loadable(path: str, base: str, out: Path) -> str:
    """A full model folder for `path`: LoRA checkpoints are merged into the base once, cached."""
    if not (Path(path) / "adapter_config.json").is_file():
        return path
    merged = out / "merged"
    if (merged / "config.json").is_file():
        return str(merged)
    from peft import PeftModel

    from .models import load_model, load_tokenizer

    model = PeftModel.from_pretrained(load_model(base), path).merge_and_unload()
    tmp = out / ".merged.tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(base).save_pretrained(tmp)
    os.replace(tmp, merged)
    return str(merged)


def _settings(samples: int, split: str, hs_sets, hs_limit: int | None, max_new_tokens: int, template: str) -> dict:
    """What a measured point depends on besides the model and the judge."""
    return {"samples": samples, "split": split, "hs_sets": list(hs_sets), "hs_limit": hs_limit,
            "max_new_tokens": max_new_tokens, **({"template": template} if template != "chat" else {})}


def analyze_checkpoint(model_path: str, out: Path, judge, *, samples: int, split: str, hs_sets: list[str],
                       hs_limit: int | None, max_new_tokens: int, batch_size: int, data_root=None,
                       template: str = "chat") -> dict:
    """Positive heads, mean divergence and HS of one model; cached in `out/point.json` per judge
    and settings (answers are reused by `generate` whenever their rows still match)."""
    from .evaluate.metrics import harmful_score, judge_identity
    from .models import load_model, load_tokenizer
    from .sink import analyze

    identity = judge_identity(judge)
    settings = _settings(samples, split, hs_sets, hs_limit, max_new_tokens, template)
    done = out / "point.json"
    old = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else {}
    if old.get("judge") == identity and old.get("settings") == settings:
        return old
    same_texts = ({k: old.get("settings", {}).get(k) for k in ("samples", "split", "template")}
                  == {"samples": samples, "split": split, "template": settings.get("template")})
    sink_file = out / "sink_divergence.json"
    if same_texts and sink_file.is_file():  # only the judge or the HS settings changed
        sink = json.loads(sink_file.read_text(encoding="utf-8"))
    else:
        sink = analyze(model_path, out, samples=samples, split=split, batch_size=batch_size, data_root=data_root,
                       template=template)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path).eval()
    hs = harmful_score(model, tokenizer, hs_sets, judge=judge, limit=hs_limit, data_root=data_root, out_dir=out,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False, template=template)
    pooled = hs["all"] if "all" in hs else hs[hs_sets[0]]
    point = {"model": model_path, "positive_heads": sink["positive_heads"], "total_heads": sink["total_heads"],
             "mean_divergence": sink["mean_divergence"], "hs": pooled["hs"], "hs_lo": pooled["hs_lo"],
             "hs_hi": pooled["hs_hi"], "n": pooled["n"], "judge": identity, "settings": settings}
    write_json(done, point)
    return point


def analyze_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, judge=None, *,
                samples: int = 64, split: str = "validation", hs_sets: tuple[str, ...] = ("beavertails",),
                hs_limit: int | None = 100, max_new_tokens: int = 64, batch_size: int = 16,
                data_root=None, template: str | None = None, drop_checkpoints: bool = False) -> dict:
    """Every checkpoint of every run: rows of `COLUMNS` in `out/sink_hypothesis.csv`, a plot of
    positive heads against HS, and Spearman's rho with its interval in `sink_hypothesis.json`.
    Texts and prompts are in `template`, by default the one each run was trained with. Each run's
    points are cached in `run_dir/analysis/<stage>/points.json`; `drop_checkpoints` then deletes its
    checkpoints (disk), and later calls reuse the cached points (small files a study can commit)."""
    from tqdm.auto import tqdm

    from .evaluate.metrics import judge_identity
    from .evaluate.stats import spearman

    if split == "train":
        raise SinkguardError("split 'train' holds Surgery's reference pools: use validation or test")
    out = Path(out or run_dir)
    if judge is None:
        from .evaluate.judge import load_judge

        judge = load_judge(auto_train=True, root=data_root)
    identity = judge_identity(judge)
    rows, stale = [], []
    measured: dict[tuple[str, str], dict] = {}
    for stage in run_stages(run_dir):
        info, steps = checkpoints(stage)
        run_template = template or info.get("template") or "chat"
        wanted = {"judge": identity,
                  "settings": _settings(samples, split, hs_sets, hs_limit, max_new_tokens, run_template)}
        cache = Path(run_dir) / "analysis" / stage.name
        if not (stage / "checkpoints").is_dir():  # measured before, checkpoints dropped
            kept = json.loads((cache / "points.json").read_text(encoding="utf-8"))
            if {k: kept.get(k) for k in wanted} == wanted:
                rows += kept["rows"]
            else:
                log.warning("%s: its checkpoints are gone and its points were measured with another judge or "
                            "settings: left out (train it again with keep_checkpoints to measure it)", stage.name)
                stale.append(stage.name)
            continue
        settings = info.get("settings", {})
        base = str(info["model"])
        stage_rows = []
        for step, path in tqdm(steps, desc=f"checkpoints of {stage.name}", unit="ckpt"):
            where = cache / f"step-{step}"
            where.mkdir(parents=True, exist_ok=True)
            key = (path, run_template)
            if key not in measured:  # runs from one starting model share their step 0
                measured[key] = analyze_checkpoint(
                    _loadable(path, base, where), where, judge, samples=samples, split=split,
                    hs_sets=list(hs_sets), hs_limit=hs_limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    data_root=data_root, template=run_template)
            point = measured[key]
            stage_rows.append({"finetuning": settings.get("defense", info.get("defense")),
                               "poison_ratio": settings.get("poison_ratio", info.get("poison_ratio_asked")),
                               "seed": settings.get("seed", info.get("config", {}).get("seed")), "step": step,
                               "positive_heads": point["positive_heads"], "hs": round(point["hs"], 4),
                               "mean_divergence": round(point["mean_divergence"], 8)})
        write_json(cache / "points.json", {**wanted, "rows": stage_rows})
        if drop_checkpoints:
            shutil.rmtree(stage / "checkpoints")
        rows += stage_rows
    write_rows(rows, out / "sink_hypothesis.csv")
    summary = {"n_points": len(rows), "runs": len({(r["finetuning"], r["poison_ratio"], r["seed"]) for r in rows}),
               "settings": {"samples": samples, "split": split, "hs_sets": list(hs_sets), "hs_limit": hs_limit,
                            "max_new_tokens": max_new_tokens}, **({"left_out": stale} if stale else {})}
    try:
        groups = [(r["finetuning"], r["poison_ratio"], r["seed"]) for r in rows]
        clustered = len(set(groups)) >= 3
        rho, lo, hi = spearman([r["positive_heads"] for r in rows], [r["hs"] for r in rows],
                               groups=[str(g) for g in groups] if clustered else None)
        summary |= {"spearman_rho": rho, "rho_lo": lo, "rho_hi": hi,
                    "interval": "cluster bootstrap over runs" if clustered else "Fisher z (points treated as independent)"}
    except SinkguardError as exc:
        summary |= {"spearman_rho": None, "note": str(exc)}
    write_json(out / "sink_hypothesis.json", summary)
    plot_heads_vs_hs(rows, out / "sink_hypothesis.png", summary)
    return summary


def write_rows(rows: list[dict], path: Path) -> Path:
    """Rows of `COLUMNS` as CSV, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    return write_text(path, buffer.getvalue())


def plot_heads_vs_hs(rows: list[dict], path: Path, summary: dict) -> Path:
    """Positive heads (x) against HS (y), one line per run in step order: a colour per (defense, p),
    a marker per seed, the starting checkpoint circled in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["finetuning"], r["poison_ratio"], r["seed"]), []).append(r)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = sorted({k[:2] for k in runs}, key=str)
    seeds = sorted({k[2] for k in runs}, key=str)
    markers = "os^DvP*X"
    for (defense, p, seed), points in sorted(runs.items(), key=str):
        points.sort(key=lambda r: r["step"])
        xs, ys = [r["positive_heads"] for r in points], [r["hs"] for r in points]
        ax.plot(xs, ys, marker=markers[seeds.index(seed) % len(markers)], markersize=3.5, linewidth=1.2,
                color=cycle[groups.index((defense, p)) % len(cycle)], label=f"{defense} p={p} seed {seed}")
        ax.plot(xs[:1], ys[:1], marker="o", markersize=8, markerfacecolor="none", markeredgecolor="black",
                linestyle="none")
    rho = summary.get("spearman_rho")
    title = (f"Spearman rho {rho:.2f} [{summary['rho_lo']:.2f}, {summary['rho_hi']:.2f}]"
             if rho is not None else "Spearman rho: n/a")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("heads with positive sink divergence")
    ax.set_ylabel("harmful score (%)")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.text(0.01, 0.01, "black circle: first checkpoint", transform=ax.transAxes, fontsize=6)
    fig.tight_layout()
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
