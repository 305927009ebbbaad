"""Judge model selection across sources: frozen-encoder probes, long-answer reading, TF-IDF ensemble.

Every candidate is scored by its *worst* per-source accuracy on the `dev` rows (leave one source
out: a trainable source is measured by a judge trained without it and without the synthetic rows
built from it; harmful_qa and alpaca are never trained on; BeaverTails by its validation split,
the only harmful training source). The chosen candidate is then measured once on the `report`
rows (BeaverTails test split and the other halves), the numbers docs/judge.md publishes.

Features (MiniLM hidden states 2, 4 and 6, mean-pooled) are computed once and cached in `--cache`
(resumable), so every candidate costs seconds. Usage:
python benchmarks/judge_select.py --cache DIR [--data-root DIR] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("judge_select")

LAYERS = (2, 4, 6)  # hidden_states indices cached; 6 is the last block of MiniLM-L6
FEATURE_SETS = {"last": (6,), "4+6": (4, 6), "2+4+6": (2, 4, 6)}
CS = (0.03, 0.1, 0.3, 1.0)
RECIPES = {  # which training rows a candidate uses
    "bt+refusals": lambda r: r["source"] in ("beavertails", "refusals") and r["recipe"] == "original",
    "+benign": lambda r: r["recipe"] == "original",
    "+benign+synthetic": lambda r: True,
}


def _features(cache: Path, name: str, model, tokenizer, rows: list[dict], max_length: int, chunks: bool):
    """(features, row_of) for `rows`, from the cache when there."""
    from sinkguard.evaluate.judge_model import _Encoded, pooled_features

    path = cache / f"{name}.npz"
    digest = hashlib.sha256(json.dumps([[r["prompt"], r["response"]] for r in rows]).encode()).hexdigest()
    if path.is_file():
        saved = np.load(path)
        if str(saved["digest"]) == digest:
            return saved["x"], saved["row_of"]
        log.info("%s: cached features are for other rows; recomputing", name)
    enc = _Encoded(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], max_length,
                   chunks=chunks, stride=64)
    start = time.process_time()
    x = pooled_features(model, enc, progress=True)
    log.info("%s: %d rows, %d windows, %.0f CPU s", name, len(rows), len(enc), time.process_time() - start)
    tmp = cache / f".{name}.tmp.npz"
    np.savez(tmp, x=x, row_of=np.asarray(enc.row_of), digest=np.asarray(digest))
    os.replace(tmp, path)
    return x, np.asarray(enc.row_of)


def _cols(feature_set: str) -> np.ndarray:
    return np.concatenate([np.arange(LAYERS.index(k) * 384, (LAYERS.index(k) + 1) * 384)
                           for k in FEATURE_SETS[feature_set]])


def _row_max(z: np.ndarray, row_of: np.ndarray, n: int, first_only: bool) -> np.ndarray:
    out = np.full(n, -np.inf)
    seen = np.zeros(n, bool)
    for value, row in zip(z, row_of):
        if first_only and seen[row]:
            continue
        seen[row] = True
        out[row] = max(out[row], value)
    return out


def _sig(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="folder for the cached features")
    parser.add_argument("--data-root", default=None, help="data folder holding hft/")
    parser.add_argument("--features-only", action="store_true", help="stop after caching the features")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from sinkguard.evaluate.judge_data import judge_data
    from sinkguard.evaluate.judge_eval import expected_calibration_error, source_metrics
    from sinkguard.evaluate.judge_model import (
        JudgeConfig,
        JudgeModel,
        fit_logistic,
        fit_temperature,
        load_encoder,
    )
    from sinkguard.evaluate.judge_tfidf import TfidfScorer

    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    config = JudgeConfig()
    data = judge_data(config, args.data_root)
    encoder, tokenizer = load_encoder(config.encoder)
    model = JudgeModel(encoder, 0.0, LAYERS)
    cpu0 = time.process_time()
    parts = {"train": data.train, "validation": data.validation}
    parts.update({f"dev.{k}": v for k, v in data.dev.items()})
    parts.update({f"report.{k}": v for k, v in data.heldout.items()})
    feats = {name: _features(cache, name, model, tokenizer, rows, 256, name != "train") for name, rows in parts.items()}
    for name in ("dev.harmful_qa", "dev.alpaca", "report.harmful_qa", "report.alpaca"):
        if name in parts:
            feats[name + ".w512"] = _features(cache, name + ".w512", model, tokenizer, parts[name], 512, False)
    feature_cpu = time.process_time() - cpu0
    if args.features_only:
        return 0

    labels = {name: np.asarray([r["harmful"] for r in rows], bool) for name, rows in parts.items()}
    train_sources = np.asarray([r["source"] for r in data.train])
    val_sources = np.asarray([r["source"] for r in data.validation])
    loso_sources = [s for s in data.dev if s in set(train_sources) and s != "beavertails"]

    def fit(feature_set: str, C: float, recipe: str, leave_out: str | None):
        cols = _cols(feature_set)
        keep = np.asarray([RECIPES[recipe](r) for r in data.train]) & (train_sources != leave_out)
        w, b = fit_logistic(feats["train"][0][keep][:, cols], labels["train"][keep], C)
        vkeep = val_sources != leave_out
        xv, rv = feats["validation"]
        zv = _row_max(xv[:, cols] @ w + b, rv, len(data.validation), False)
        t = fit_temperature(labels["validation"][vkeep].tolist(), zv[vkeep].tolist())
        return cols, w, b, t

    def logits(part: str, model_: tuple, mode: str) -> np.ndarray:
        cols, w, b, t = model_
        if mode == "window512" and part + ".w512" in feats:
            x, r = feats[part + ".w512"]
            return _row_max(x[:, cols] @ w + b, r, len(parts[part]), True) / t
        x, r = feats[part]
        return _row_max(x[:, cols] @ w + b, r, len(parts[part]), mode == "truncate") / t

    def table(feature_set: str, C: float, recipe: str, prefix: str, modes=("truncate", "chunks", "window512"),
              tfidf: dict | None = None, weight: float = 0.0) -> dict:
        """Per-source metrics for each long-answer mode: LOSO for trainable sources."""
        full = fit(feature_set, C, recipe, None)
        out = {m: {} for m in modes}
        for source in data.dev:
            part = f"{prefix}.{source}"
            model_ = fit(feature_set, C, recipe, source) if source in loso_sources else full
            for m in modes:
                p = _sig(logits(part, model_, m))
                if weight:
                    p = (1 - weight) * p + weight * tfidf[source if source in loso_sources else None](parts[part])
                metrics = source_metrics(labels[part].tolist(), (p >= 0.5).tolist())
                metrics["ece"] = expected_calibration_error(labels[part].tolist(), p.tolist())
                out[m][source] = metrics
        return out

    def worst(tab: dict) -> float:
        return min(m["accuracy"] for m in tab.values())

    cpu1 = time.process_time()
    grid = []
    for feature_set in FEATURE_SETS:
        for C in CS:
            for recipe in RECIPES:
                tab = table(feature_set, C, recipe, "dev")
                for mode, per in tab.items():
                    grid.append({"features": feature_set, "C": C, "recipe": recipe, "long_answers": mode,
                                 "worst": worst(per), "dev": per})
                log.info("%s C=%s %s: worst dev accuracy %s", feature_set, C, recipe,
                         {m: round(worst(p), 3) for m, p in tab.items()})
    grid.sort(key=lambda g: (g["worst"], g["dev"]["beavertails"]["accuracy"]), reverse=True)
    best = grid[0]
    grid_cpu = time.process_time() - cpu1

    # TF-IDF + LR ensemble on the best probe: one TF-IDF model per left-out source.
    cpu2 = time.process_time()
    keep_rows = [r for r in data.train if RECIPES[best["recipe"]](r)]
    tfidf = {s: TfidfScorer.fit([r for r in keep_rows if r["source"] != s]) for s in [None, *loso_sources]}
    tfidf_fns = {s: (lambda rows, m=m: np.asarray(m.score(rows))) for s, m in tfidf.items()}
    ensembles = []
    for weight in (0.0, 0.2, 0.35, 0.5, 1.0):
        tab = table(best["features"], best["C"], best["recipe"], "dev", (best["long_answers"],), tfidf_fns, weight)
        per = tab[best["long_answers"]]
        ensembles.append({"tfidf_weight": weight, "worst": worst(per), "dev": per})
        log.info("ensemble tfidf weight %.2f: worst dev accuracy %.3f", weight, worst(per))
    ensemble_cpu = time.process_time() - cpu2
    chosen_weight = max(ensembles, key=lambda e: (e["worst"], -e["tfidf_weight"]))["tfidf_weight"]
    report = table(best["features"], best["C"], best["recipe"], "report",
                   ("truncate", "chunks", "window512"), tfidf_fns, 0.0)
    report_ens = table(best["features"], best["C"], best["recipe"], "report", (best["long_answers"],),
                       tfidf_fns, chosen_weight)[best["long_answers"]] if chosen_weight else None
    result = {"best": {k: best[k] for k in ("features", "C", "recipe", "long_answers", "worst")},
              "best_dev": best["dev"], "report": report, "tfidf_weight_chosen": chosen_weight,
              "report_ensemble": report_ens, "ensembles": [{k: e[k] for k in ("tfidf_weight", "worst")}
                                                           for e in ensembles],
              "top10": [{k: g[k] for k in ("features", "C", "recipe", "long_answers", "worst")} for g in grid[:10]],
              "grid": [{k: g[k] for k in ("features", "C", "recipe", "long_answers", "worst")} for g in grid],
              "cpu_seconds": {"features": round(feature_cpu, 1), "grid": round(grid_cpu, 1),
                              "tfidf_ensemble": round(ensemble_cpu, 1)},
              "n_candidates": len(grid) + len(ensembles)}
    (cache / "selection.json").write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    print(f"best: {result['best']}  (TF-IDF weight chosen: {chosen_weight})")
    print("| source | mode | accuracy | sensitivity | specificity | n_harmful | n_safe | ECE |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, per in report.items():
        for source, m in per.items():
            sens = "-" if m["sensitivity"] is None else f"{m['sensitivity']:.3f}"
            spec = "-" if m["specificity"] is None else f"{m['specificity']:.3f}"
            print(f"| {source} | {mode} | {m['accuracy']:.3f} | {sens} | {spec} | {m['n_harmful']} | "
                  f"{m['n_safe']} | {m['ece']:.3f} |")
    print(f"CPU seconds: {result['cpu_seconds']}; candidates: {result['n_candidates']}")
    return 0 if math.isfinite(best["worst"]) else 1


if __name__ == "__main__":
    sys.exit(main())
