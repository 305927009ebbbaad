"""The new judge against the current (previous) one and a TF-IDF + LR baseline, measured in one run.

All three on the same held-out `report` rows (`sinkguard.evaluate.judge_data`): the BeaverTails
test split (accuracy, F1, ECE) and every other source (sensitivity, specificity, accuracy); rows a
judge was trained on are left out of its numbers (the previous judge trained on 80% of harmful_qa,
so only its own held-out harmful_qa rows count). Also reported: training time, reload time and
scoring speed. `--retrain` trains the new judge in this run (into a temporary folder). With
`--previous`, a paired exact McNemar test per source (rows only one of the two judges gets right),
Holm-corrected over the sources.
Usage: python benchmarks/judge_quality.py [--judge DIR] [--previous DIR] [--retrain] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _previous_training_rows(judge, root) -> set[tuple[str, str]]:
    """(prompt, response) pairs a format-1 judge trained on from harmful_qa (its 80% split, seeded)."""
    from sinkguard.data import load_source
    from sinkguard.data.mixing import is_harmful_note

    config = judge.info.get("config", {})
    if "harmful_qa" not in config:  # a judge of this version never trains on harmful_qa
        return set()
    fraction, seed = config.get("heldout_fraction", 0.2), config.get("split_seed", 0)
    qa = load_source("harmful_qa", "train", root)
    seen = set()
    for harmful in (True, False):
        rows = [r for r in qa if is_harmful_note(r.get("label_note", "Harmful")) == harmful]
        if harmful and not config.get("harmful_qa", True):
            continue
        if not harmful and config.get("not_harmful_qa", "safe") != "safe":
            continue
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        seen |= {(rows[i]["prompt"], rows[i]["response"]) for i in order[int(round(fraction * len(rows))):]}
    return seen


def _measure_judge(judge, data, root) -> dict:
    from sinkguard.evaluate.judge import binary_metrics, expected_calibration_error, source_metrics

    seen = _previous_training_rows(judge, root)
    out = {"identity": judge.identity, "train_seconds": judge.info.get("train_seconds"), "sources": {}, "correct": {}}
    start = time.perf_counter()
    n = 0
    for name, rows in data.heldout.items():
        rows = [r for r in rows if (r["prompt"], r["response"]) not in seen]
        scores = judge.score([r["prompt"] for r in rows], [r["response"] for r in rows])
        n += len(rows)
        labels = [r["harmful"] for r in rows]
        flags = [judge.decide(s) for s in scores]
        out["correct"][name] = {(r["prompt"], r["response"]): f == y for r, f, y in zip(rows, flags, labels)}
        out["sources"][name] = {**source_metrics(labels, flags), "ece": expected_calibration_error(labels, scores)}
        if name == "beavertails":
            out["beavertails_test"] = {**binary_metrics(labels, flags), "ece": out["sources"][name]["ece"]}
    out["score_pairs_per_second"] = round(n / (time.perf_counter() - start), 1)
    out["worst_source_accuracy"] = min(m["accuracy"] for m in out["sources"].values())
    return out


def _paired(new: dict, previous: dict) -> dict:
    """Per source, the rows (judged by both) only the new / only the previous judge gets right, with
    the exact McNemar p-value, Holm-corrected over the sources."""
    from sinkguard.evaluate.stats import discordant, holm, mcnemar_exact

    out = {}
    for source in new:
        common = sorted(set(new[source]) & set(previous.get(source, {})))
        b, c = discordant([new[source][k] for k in common], [previous[source][k] for k in common])
        out[source] = {"n": len(common), "new_only": b, "previous_only": c, "p": mcnemar_exact(b, c)}
    for source, p_holm in zip(out, holm([m["p"] for m in out.values()])):
        out[source]["p_holm"] = p_holm
    return out


def measure(judge_path: str | None, previous_path: str | None, retrain: bool, data_root: str | None) -> dict:
    """Load (or train) the new judge and load the previous one; measure both and the baseline."""
    from sinkguard.evaluate.judge import (
        Judge,
        JudgeConfig,
        TfidfScorer,
        expected_calibration_error,
        judge_data,
        load_judge,
        source_metrics,
        train_judge,
    )

    with tempfile.TemporaryDirectory(prefix="judge-bench-") as tmp:
        if retrain:
            judge = train_judge(JudgeConfig(), data_root, path=os.path.join(tmp, "judge"))
            path = judge.path
        else:
            judge = load_judge(True, judge_path, data_root)
            path = judge.path
        start = time.perf_counter()
        judge = Judge.load(path)
        reload_s = time.perf_counter() - start
    data = judge_data(JudgeConfig.from_dict(judge.info.get("config", {})), data_root)
    result = {"new": _measure_judge(judge, data, data_root), "reload_seconds": round(reload_s, 3)}
    result["new"]["leave_one_source_out"] = judge.info.get("leave_one_source_out")
    result["new"]["calibration"] = judge.info.get("calibration")
    if previous_path:
        result["previous"] = _measure_judge(Judge.load(previous_path), data, data_root)
        result["paired"] = _paired(result["new"].pop("correct"), result["previous"].pop("correct"))
    result["new"].pop("correct", None)
    start = time.process_time()
    tfidf = TfidfScorer.fit(data.train)
    baseline = {"fit_cpu_seconds": round(time.process_time() - start, 1), "sources": {}}
    for name, rows in data.heldout.items():
        scores = tfidf.score(rows)
        labels = [r["harmful"] for r in rows]
        baseline["sources"][name] = {**source_metrics(labels, [s >= 0.5 for s in scores]),
                                     "ece": expected_calibration_error(labels, scores)}
    baseline["worst_source_accuracy"] = min(m["accuracy"] for m in baseline["sources"].values())
    result["baseline_tfidf_lr"] = baseline
    result["data"] = data.counts()
    return result


def _rate(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default=None, help="new judge folder (default: the cached one)")
    parser.add_argument("--previous", default=None, help="folder of the judge to compare with")
    parser.add_argument("--retrain", action="store_true", help="train the new judge in this run")
    parser.add_argument("--data-root", default=None, help="data folder holding hft/")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sinkguard.errors import SinkguardError

    try:
        result = measure(args.judge, args.previous, args.retrain, args.data_root)
    except SinkguardError as exc:
        print(f"judge_quality: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    models = [k for k in ("new", "previous", "baseline_tfidf_lr") if k in result]
    print("| source | judge | accuracy | sensitivity | specificity | n_harmful | n_safe | ECE |")
    print("|---|---|---|---|---|---|---|---|")
    for source in result["new"]["sources"]:
        for model in models:
            m = result[model]["sources"][source]
            print(f"| {source} | {model} | {_rate(m['accuracy'])} | {_rate(m['sensitivity'])} | "
                  f"{_rate(m['specificity'])} | {m['n_harmful']} | {m['n_safe']} | {m['ece']:.3f} |")
    if "paired" in result:
        print("\n| source | rows | only new right | only previous right | McNemar p (Holm) |\n|---|---|---|---|---|")
        for source, m in result["paired"].items():
            print(f"| {source} | {m['n']} | {m['new_only']} | {m['previous_only']} | {m['p_holm']:.3g} |")
    for model in models:
        print(f"{model}: worst source accuracy {result[model]['worst_source_accuracy']:.3f}")
    new = result["new"]
    print(f"new judge {new['identity']}: trained in {new['train_seconds']} s; reload {result['reload_seconds']:.2f} s; "
          f"scoring {new['score_pairs_per_second']} pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
