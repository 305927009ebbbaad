"""Plots and tables: sink-divergence heatmaps, HS/FA tables and curves."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .io import save_figure, write_text


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
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


CSV_COLUMNS = (
    "alignment", "finetuning", "post", "task", "poison_ratio", "seed", "hs_set", "n_prompts", "hs", "hs_lo",
    "hs_hi", "hs_corrected", "hs_corrected_lo", "hs_corrected_hi", "refusal", "fa", "fa_lo", "fa_hi",
    "benign_refusal", "benign_refusal_lo", "benign_refusal_hi", "judge", "wall_s",
)
SIGNIFICANCE = 0.05  # family-wise, after Holm's correction
_STAGE_LABELS = ("base", "aligned")  # records of models before fine-tuning


def _train_wall(model_path: str) -> float | None:
    """Wall time of the training stage that wrote `model_path` (its train_log.json), if any."""
    import json

    log_path = Path(str(model_path)).parent / "train_log.json"
    if not log_path.is_file():
        return None
    try:
        return json.loads(log_path.read_text(encoding="utf-8")).get("wall_s")
    except (ValueError, UnicodeDecodeError):
        return None


def record_fields(r: dict) -> dict:
    """A results.json record's measured fields from one model's evaluation (see evaluate.study).

    Flat `hs_<set>`, `refusal_<set>`, `hs_<set>_n` per prompt set (and `all` pooled), `fa`; the
    intervals, corrected HS and verdict bits per set under `sets`; over-refusal under
    `benign_refusal*`; `judge` (identity) and `wall_s` (training stage + evaluation).
    """
    fa = r.get("fa") or {}
    rec = {"fa": fa.get("fa"), "fa_lo": fa.get("fa_lo"), "fa_hi": fa.get("fa_hi"), "fa_n": fa.get("n"),
           "fa_flags": fa.get("flags")}
    sets = {}
    for name, s in (r.get("hs") or {}).items():
        rec[f"hs_{name}"] = s["hs"]
        rec[f"refusal_{name}"] = s["refusal_rate"]
        rec[f"hs_{name}_n"] = s["n"]
        sets[name] = {k: s.get(k) for k in ("hs", "hs_lo", "hs_hi", "n", "refusal_rate", "hs_corrected",
                                            "hs_corrected_lo", "hs_corrected_hi", "hs_corrected_source",
                                            "hs_corrected_by_source", "flags")}
    rec["sets"] = sets
    benign = r.get("benign") or {}
    rec |= {k: benign.get(k) for k in ("benign_refusal", "benign_refusal_lo", "benign_refusal_hi",
                                       "judge_refusal", "judge_refusal_lo", "judge_refusal_hi", "benign_flagged")}
    rec["benign_n"] = benign.get("n")
    if "positive_heads" in r:
        rec["positive_heads"] = r["positive_heads"]
    train = _train_wall(r.get("model", ""))
    rec["judge"] = r.get("judge")
    rec["wall_s"] = round((train or 0.0) + float(r.get("wall_s") or 0.0), 1)
    return rec


def _stages(r: dict) -> tuple[str, str, str]:
    """(alignment, finetuning, post) defense names of a record, `none` where a stage has none."""
    aligner = r.get("alignment") or "none"
    finetuning = "none" if r["defense"] in _STAGE_LABELS else r["defense"]
    return ("none" if aligner in ("-", None) else aligner), finetuning, r.get("post") or "none"


def _hs(r: dict, name: str) -> dict:
    """Per-set details of a record (older records: just the flat HS and count)."""
    sets = r.get("sets") or {}
    if name in sets:
        return sets[name]
    return {"hs": r.get(f"hs_{name}"), "n": r.get(f"hs_{name}_n"), "refusal_rate": r.get(f"refusal_{name}")}


def hs_set_names(results: dict) -> list[str]:
    """The prompt sets a results file holds, `all` (pooled) last when present."""
    names = sorted({k[3:] for r in results["records"] for k in r
                    if k.startswith("hs_") and not k.endswith(("_n", "_lo", "_hi")) and not k.startswith("hs_corr")})
    return [n for n in names if n != "all"] + (["all"] if "all" in names else [])


def _pooled_flags(r: dict) -> str | None:
    """HS verdict bits over every prompt set (the `all` row's, or the sets' joined)."""
    sets = r.get("sets") or {}
    if "all" in sets and sets["all"].get("flags"):
        return sets["all"]["flags"]
    bits = [sets[k].get("flags") for k in sorted(sets) if k != "all"]
    return "".join(bits) if bits and all(bits) else None


def reference_key(r: dict) -> tuple | None:
    """Key of the SFT model a record is compared with: SFT in every stage the record's model went
    through (alignment by SFT if it was aligned, SFT fine-tuning, no post-fine-tuning defense),
    same task, p and seed. None for models before fine-tuning and for that reference itself."""
    aligner, finetuning, post = _stages(r)
    if finetuning == "none" and post == "none":
        return None
    ref = ("none" if aligner == "none" else "sft", "sft", "none")
    if (aligner, finetuning, post) == ref:
        return None
    return (*ref, r["task"], r["poison_ratio"])


def _model_key(r: dict) -> tuple:
    return (*_stages(r), r["task"], r["poison_ratio"])


def paired_tests(results: dict, metric: str = "hs") -> dict[tuple, dict]:
    """Each defense against SFT at the same (task, p), pair by pair on the same prompts, over seeds.

    Per seed, the discordant pairs (prompts only the defense's model flags, only SFT's) of the
    pooled HS verdicts (`metric="hs"`) or of the FA correctness (`"fa"`); summed over the seeds
    both models have, the exact McNemar test; p-values Holm-corrected over every comparison.
    Returns, per model key, b, c, seeds, p, p_holm and `significant`.
    """
    from .evaluate.stats import discordant, holm, mcnemar_exact

    def flags(r: dict) -> str | None:
        return _pooled_flags(r) if metric == "hs" else r.get("fa_flags")

    by_key = {(*_model_key(r), r["seed"]): r for r in results["records"]}
    tests: dict[tuple, dict] = {}
    for r in results["records"]:
        ref_key = reference_key(r)
        if ref_key is None or (*ref_key, r["seed"]) not in by_key:
            continue
        mine, theirs = flags(r), flags(by_key[(*ref_key, r["seed"])])
        if not mine or not theirs or len(mine) != len(theirs):
            continue  # not the same prompts: no paired test
        b, c = discordant([x == "1" for x in mine], [x == "1" for x in theirs])
        t = tests.setdefault(_model_key(r), {"b": 0, "c": 0, "seeds": 0, "reference": ref_key})
        t["b"] += b
        t["c"] += c
        t["seeds"] += 1
    keys = list(tests)
    for key in keys:
        tests[key]["p"] = mcnemar_exact(tests[key]["b"], tests[key]["c"])
    for key, adjusted in zip(keys, holm([tests[k]["p"] for k in keys]), strict=True):
        tests[key]["p_holm"] = adjusted
        tests[key]["significant"] = adjusted < SIGNIFICANCE
    return tests


def _interval(values: list[float], los: list, his: list,
              upper: float | None = 100.0) -> tuple[float | None, float | None, float | None]:
    """Mean over seeds with its t-interval (clipped to [0, upper]: percentages by default); for one
    seed, that model's own (Wilson) interval."""
    from .evaluate.stats import mean_interval

    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    if len(values) == 1:
        return values[0], (los[0] if los else None), (his[0] if his else None)
    mean, lo, hi = mean_interval(values)
    return mean, max(0.0, lo), hi if upper is None else min(upper, hi)


def _cell(mean, lo, hi) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.1f}" if lo is None or hi is None else f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(_model_key(r), []).append(r)
    return groups


def summarize(results: dict) -> list[dict]:
    """One row per model (stages, task, p) over seeds: each metric's mean and 95 % interval."""
    names = hs_set_names(results)
    hs_tests, fa_tests = paired_tests(results, "hs"), paired_tests(results, "fa")
    rows = []
    for key, recs in _groups(results["records"]).items():
        row = {"alignment": key[0], "finetuning": key[1], "post": key[2], "task": key[3], "poison_ratio": key[4],
               "seeds": len(recs)}
        for name in names:
            details = [_hs(r, name) for r in recs]
            row[f"hs_{name}"] = _interval([d.get("hs") for d in details], [d.get("hs_lo") for d in details],
                                          [d.get("hs_hi") for d in details])
            row[f"hs_corrected_{name}"] = _interval(
                [d.get("hs_corrected") for d in details], [d.get("hs_corrected_lo") for d in details],
                [d.get("hs_corrected_hi") for d in details])
            row[f"refusal_{name}"] = _interval([d.get("refusal_rate") for d in details], [], [])
        for metric in ("fa", "benign_refusal", "judge_refusal", "positive_heads"):
            row[metric] = _interval([r.get(metric) for r in recs], [r.get(f"{metric}_lo") for r in recs],
                                    [r.get(f"{metric}_hi") for r in recs],
                                    upper=None if metric == "positive_heads" else 100.0)
        row["hs_test"], row["fa_test"] = hs_tests.get(key), fa_tests.get(key)
        row["judge"] = sorted({str(r.get("judge")) for r in recs})
        rows.append(row)
    return rows


def _mark(test: dict | None) -> str:
    """'b/c, p_Holm' of a paired test, with * when significant after Holm."""
    if not test:
        return "-"
    star = " *" if test["significant"] else ""
    return f"{test['b']}/{test['c']}, p={test['p_holm']:.3g}{star}"


def results_table(results: dict) -> str:
    """Markdown table, one row per model over seeds: mean [95 % interval] of HS per prompt set
    (and pooled), the corrected HS, refusal rates, FA, positive heads, and the paired tests
    against SFT (discordant prompts defense/SFT, Holm-corrected p, * when < 0.05)."""
    names = hs_set_names(results)
    main = "all" if "all" in names else names[0] if names else None
    header = ["alignment", "finetuning", "post", "task", "p", "seeds"] + [f"HS {n} (%)" for n in names]
    header += [f"HS {main} corrected (%)", f"refusal {main} (%)", "benign refusal (%)", "FA (%)", "positive heads",
               "HS vs SFT (b/c, p Holm)", "FA vs SFT (b/c, p Holm)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summarize(results):
        p = row["poison_ratio"]
        cells = [row["alignment"], row["finetuning"], row["post"], row["task"], "-" if p is None else f"{p:g}",
                 str(row["seeds"])]
        cells += [_cell(*row[f"hs_{n}"]) for n in names]
        cells += [_cell(*row[f"hs_corrected_{main}"]) if main else "n/a",
                  _cell(*row[f"refusal_{main}"]) if main else "n/a",
                  _cell(*row["benign_refusal"]), _cell(*row["fa"]), _cell(*row["positive_heads"]),
                  _mark(row["hs_test"]), _mark(row["fa_test"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correction_table(results: dict) -> str:
    """How the pooled corrected HS moves with each judge source's sensitivity and specificity."""
    names = hs_set_names(results)
    main = "all" if "all" in names else names[0] if names else None
    sources = sorted({s for r in results["records"] for s in (_hs(r, main).get("hs_corrected_by_source") or {})})
    if not main or not sources:
        return ""
    lines = ["| alignment | finetuning | post | task | p | seed | HS (%) | " + " | ".join(sources) + " |",
             "|" + "---|" * (7 + len(sources))]
    for r in results["records"]:
        d = _hs(r, main)
        by = d.get("hs_corrected_by_source") or {}
        p = r["poison_ratio"]
        cells = [*_stages(r), r["task"], "-" if p is None else f"{p:g}", str(r["seed"]), _cell(d.get("hs"), None, None)]
        cells += [_cell(by.get(s), None, None) for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_rows(results: dict) -> list[dict]:
    """One row per (model, harmful set) and a pooled `hs_set = all` row, in `CSV_COLUMNS`."""
    rows = []
    names = hs_set_names(results)
    for r in results["records"]:
        aligner, finetuning, post = _stages(r)
        base = {"alignment": aligner, "finetuning": finetuning, "post": post, "task": r["task"],
                "poison_ratio": r["poison_ratio"], "seed": r["seed"], "refusal": None, "fa": r.get("fa"),
                "fa_lo": r.get("fa_lo"), "fa_hi": r.get("fa_hi"), "benign_refusal": r.get("benign_refusal"),
                "benign_refusal_lo": r.get("benign_refusal_lo"), "benign_refusal_hi": r.get("benign_refusal_hi"),
                "judge": r.get("judge"), "wall_s": r.get("wall_s")}
        set_names = [n for n in names if n != "all" and _hs(r, n).get("hs") is not None]
        for name in set_names + ["all"]:
            d = _hs(r, name)
            if d.get("hs") is None:
                if len(set_names) != 1:
                    continue
                d = _hs(r, set_names[0])  # one set: the pooled row is that set
            rows.append(base | {"hs_set": name, "n_prompts": d.get("n"), "hs": d.get("hs"), "hs_lo": d.get("hs_lo"),
                                "hs_hi": d.get("hs_hi"), "hs_corrected": d.get("hs_corrected"),
                                "hs_corrected_lo": d.get("hs_corrected_lo"),
                                "hs_corrected_hi": d.get("hs_corrected_hi"), "refusal": d.get("refusal_rate")})
    return [{k: row.get(k) for k in CSV_COLUMNS} for row in rows]


def write_csv(results: dict, path: str | os.PathLike) -> Path:
    """Write `csv_rows(results)` atomically (empty cells for missing values, 4 decimals)."""
    import csv
    from io import StringIO

    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(results):
        writer.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return write_text(path, buffer.getvalue())


def mean_logged_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over every logged step, each log weighted by the steps it covers; unlike the
    Trainer's `training_loss`, it counts the steps before a resume too."""
    total = steps = previous = 0
    for entry in log_history:
        if "loss" in entry:
            covered = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * covered, steps + covered, entry["step"]
    return total / steps if steps else None


def stage_times(run_dir: str | os.PathLike) -> str:
    """Markdown table of every finished stage's own wall time (from its train_log.json, eval.json or
    repair_log.json) and, for training stages, the training loss: the run's mean and its last logged step."""
    import functools
    import json

    @functools.cache
    def info(folder: Path) -> dict:
        for name in ("train_log.json", "eval.json", "repair_log.json"):
            if (folder / name).is_file():
                return json.loads((folder / name).read_text())
        return {}

    def label(folder: Path) -> str:
        """Stage name without its hash (alignment stages with their seed), after the stage it started from."""
        log = info(folder)
        model = Path(str(log.get("model", "")))
        source = label(model.parent) if model.parent.parent.name == "stages" else ""
        if folder.name.startswith("eval-"):
            return f"eval of {source or model}"
        name = folder.name.rsplit("-", 1)[0]
        seed = (log.get("settings") or {}).get("seed")
        if folder.name.startswith("align-") and seed is not None:
            name += f" s{seed}"
        return name + (f" (from {source})" if source else "")

    def losses(log: dict) -> str:
        steps = [e["loss"] for e in log.get("log_history", []) if "loss" in e]
        mean = mean_logged_loss(log.get("log_history", []))
        mean = log.get("train_loss") if mean is None else mean
        return " | ".join(f"{v:.4f}" if v is not None else "" for v in (mean, steps[-1] if steps else None))

    order = {"align": 0, "ft": 1, "post": 2}

    def resumed(log: dict) -> str:
        return f" (resumed at step {log['resumed_at_step']}: wall of that invocation)" if log.get("resumed_at_step") else ""

    rows = sorted((order.get(f.name.split("-")[0], 3), label(f) + resumed(info(f)), info(f)["wall_s"], losses(info(f)))
                  for f in Path(run_dir, "stages").glob("*") if info(f).get("wall_s") is not None)
    lines = [f"| {name} | {wall / 60:.1f} | {loss} |" for _, name, wall, loss in rows]
    header = ["| stage | wall (min) | training loss (mean) | training loss (last step) |", "|---|---|---|---|"]
    return "\n".join([*header, *lines]) if lines else ""


def plot_versus_ratio(results: dict, metric: str, path: str | os.PathLike, ylabel: str) -> Path:
    """`metric` against the poison ratio, one line per model, with 95 % error bars (over seeds,
    or the model's own interval for one seed); models before fine-tuning as horizontal lines.
    With a single poison ratio, one horizontal bar per model instead (a line needs two points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric.removeprefix("hs_") if metric.startswith("hs_") else None
    references: list[tuple[str, float, float | None, float | None]] = []
    series: dict[tuple, list[tuple[float, float, float | None, float | None]]] = {}
    for row in summarize(results):
        mean, lo, hi = row[f"hs_{key}"] if key else row[metric]
        if mean is None:
            continue
        stages = [s for s in (row["alignment"], row["finetuning"], row["post"]) if s != "none"]
        name = " + ".join(stages) or "base"
        if row["poison_ratio"] is None:
            references.append((f"{name} model ({row['task']})", mean, lo, hi))
        else:
            series.setdefault((row["task"], name), []).append((row["poison_ratio"], mean, lo, hi))
    ratios = {p[0] for points in series.values() for p in points}
    if len(ratios) == 1:
        fig = _bar_chart(references, series, f"{ylabel}, p = {ratios.pop():g}")
    else:
        fig, ax = plt.subplots(figsize=(5.8, 4.0))
        for label, mean, _, _ in references:
            ax.axhline(mean, linestyle="--", linewidth=1, color="k" if "base" not in label else "gray", label=label)
        for (task, name), points in sorted(series.items()):
            points.sort()
            err = [[y - (lo if lo is not None else y) for _, y, lo, _ in points],
                   [(hi if hi is not None else y) - y for _, y, _, hi in points]]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=err, marker="o", capsize=3,
                        label=f"{name} ({task})")
        ax.set_xlabel("poison ratio p")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _bar_chart(references: list[tuple], series: dict, xlabel: str):
    """One horizontal bar per model (reference models in gray), 95 % error bars where known."""
    import matplotlib.pyplot as plt

    bars = [(label, mean, lo, hi, "0.6") for label, mean, lo, hi in references]
    bars += [(f"{name} ({task})", y, lo, hi, "C0") for (task, name), [(_, y, lo, hi)] in sorted(series.items())]
    fig, ax = plt.subplots(figsize=(5.8, 1.2 + 0.32 * len(bars)))
    ys = range(len(bars))[::-1]
    err = [[y - (lo if lo is not None else y) for _, y, lo, _, _ in bars],
           [(hi if hi is not None else y) - y for _, y, _, hi, _ in bars]]
    ax.barh(list(ys), [b[1] for b in bars], xerr=err, color=[b[4] for b in bars], capsize=3)
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


RECORD_KEYS = ("defense", "task", "poison_ratio", "seed")  # what the tables and tests group by


def load_results(run_dir: str | os.PathLike) -> dict:
    """A run's results.json, or one clear error."""
    from .errors import SinkguardError
    from .io import read_json

    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise SinkguardError(f"{path} not found: run `sinkguard run CONFIG` first (or point to its run dir)")
    results = read_json(path, "results file")
    if not isinstance(results, dict) or not isinstance(results.get("records"), list):
        raise SinkguardError(f"{path} has no 'records' list: it is not a sinkguard results file")
    for i, record in enumerate(results["records"]):
        missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise SinkguardError(f"{path}: record {i} lacks {', '.join(missing)}: it is not a sinkguard results "
                                 "file (or was edited); rerun `sinkguard run CONFIG` to rewrite it")
    return results


def write_report(run_dir: str | os.PathLike) -> Path:
    """`RUN_DIR/report.md`: the results table with intervals and paired tests, plots with error bars."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    plots = []
    for name in hs_set_names(results):
        plots.append(plot_versus_ratio(results, f"hs_{name}", run_dir / f"hs_{name}.png", f"harmful score {name} (%)"))
    for key, ylabel in (("fa", "fine-tune accuracy (%)"), ("benign_refusal", "refusal on benign prompts (%)"),
                        ("positive_heads", "heads with positive sink divergence")):
        if any(r.get(key) is not None for r in results["records"]):  # e.g. no sink analysis configured
            plots.append(plot_versus_ratio(results, key, run_dir / f"{key}.png", ylabel))
    timing = ", ".join(f"{k} {v / 60:.1f} min" for k, v in results.get("stage_wall_s", {}).items())  # cached stages: 0
    stages = stage_times(run_dir)
    judges = sorted({str(r.get("judge")) for r in results["records"] if r.get("judge")})
    corrections = correction_table(results)
    text = "\n\n".join(part for part in [
        f"# {results.get('name', run_dir.name)}: {results.get('model', '')}",
        "**Not finished**: the tables hold the cells answered so far; `sinkguard run` with the same config "
        "resumes." if results.get("complete") is False else "",
        "HS: % of answers the judge flags on harmful prompts (lower is better), per prompt set and pooled "
        "('all'); corrected: Rogan-Gladen prevalence from the judge's sensitivity and specificity; refusal: "
        "keyword refusal rate; benign refusal: keyword refusal rate on benign AlpacaEval prompts; FA: fine-tune "
        "accuracy on the task's test rows; positive heads: (layer, head) pairs whose sink divergence is > 0. "
        "Cells: mean [95 % interval] over seeds (t), or for one seed the model's Wilson interval over prompts. "
        "vs SFT: prompts only this model / only SFT flags (HS) or gets right (FA), summed over seeds, exact "
        "McNemar p Holm-corrected over all comparisons; * marks p < 0.05. p '-' rows are models before "
        "fine-tuning.",
        results_table(results),
        f"Judge(s): {', '.join(judges)}." if judges else "",
        f"Corrected pooled HS under each judge source's sensitivity and specificity:\n\n{corrections}"
        if corrections else "",
        f"Wall time per stage in the last invocation (cached stages count 0): {timing}." if timing else "",
        f"Wall time and training loss of each stage when it ran:\n\n{stages}" if stages else "",
        "\n".join(f"![{p.stem}]({p.name})" for p in plots),
    ] if part)
    return write_text(run_dir / "report.md", text + "\n")
