"""The harmfulness judge against a TF-IDF + logistic-regression baseline, measured in one run.

Both are trained on the same rows (BeaverTails train + refusals + harmful_qa, see
`sinkguard.evaluate.judge.judge_data`), selected on the BeaverTails validation split and measured
on its test split; also reported: the held-out refusals / harmful_qa rows, the judge's training
time, its reload time and its scoring speed. By default the cached judge is used (trained first if
there is none); `--retrain` trains a fresh one in this run (into a temporary folder).
Usage: python benchmarks/judge_quality.py [--retrain] [--data-root DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(retrain: bool, judge_path: str | None, data_root: str | None) -> dict:
    """Train or load the judge, then judge and baseline metrics, held-out report and timings."""
    from sinkguard.evaluate.judge import (
        Judge,
        JudgeConfig,
        evaluate_judge,
        heldout_report,
        judge_data,
        load_judge,
        tfidf_baseline,
        train_judge,
    )

    with tempfile.TemporaryDirectory(prefix="judge-bench-") as tmp:
        if retrain:
            judge = train_judge(JudgeConfig(), data_root, path=os.path.join(tmp, "judge"))
        else:
            judge = load_judge(auto_train=True, path=judge_path, root=data_root)
        start = time.perf_counter()
        judge = Judge.load(judge.path)
        reload_s = time.perf_counter() - start
    config = JudgeConfig.from_dict(judge.info.get("config", {}))
    data = judge_data(config, data_root)
    start = time.perf_counter()
    test = evaluate_judge(judge, data.test)
    score_s = time.perf_counter() - start
    validation = evaluate_judge(judge, data.validation)
    start = time.perf_counter()
    baseline = tfidf_baseline(data, seed=config.seed)
    baseline_s = time.perf_counter() - start
    return {
        "judge": {"encoder": config.encoder, "best_epoch": judge.info.get("best_epoch"),
                  "validation": validation, "test": test},
        "baseline_tfidf_lr": {"C": baseline["C"], "validation": baseline["validation"],
                              "test": baseline["test"], "fit_seconds": round(baseline_s, 1)},
        "accuracy_ratio": test["accuracy"] / max(baseline["test"]["accuracy"], 1e-9),
        "f1_ratio": test["f1"] / max(baseline["test"]["f1"], 1e-9),
        "heldout": heldout_report(judge, data),
        "data": data.counts(),
        "train_seconds": judge.info.get("train_seconds"),
        "retrained_in_this_run": retrain,
        "reload_seconds": round(reload_s, 3),
        "score_pairs_per_second": round(test["n"] / score_s, 1),
        "threads": config.threads,
    }


def _row(name: str, m: dict) -> str:
    return (f"| {name} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
            f"{m['f1']:.3f} | {m['n']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="train a fresh judge in this run")
    parser.add_argument("--judge", default=None, help="trained judge folder (default: the cached one)")
    parser.add_argument("--data-root", default=None, help="data folder holding hft/")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sinkguard.errors import SinkguardError

    try:
        result = measure(args.retrain, args.judge, args.data_root)
    except SinkguardError as exc:
        print(f"judge_quality: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    judge, base = result["judge"], result["baseline_tfidf_lr"]
    print(f"BeaverTails test split ({judge['test']['n']} rows); judge: {judge['encoder']} fine-tuned, "
          f"epoch {judge['best_epoch']}; baseline: TF-IDF + LR (C={base['C']})\n")
    print("| model | accuracy | precision | recall | F1 | n |\n|---|---|---|---|---|---|")
    print(_row("judge (test)", judge["test"]))
    print(_row("TF-IDF + LR (test)", base["test"]))
    print(_row("judge (validation)", judge["validation"]))
    print(_row("TF-IDF + LR (validation)", base["validation"]))
    print(f"\naccuracy ratio judge / baseline: {result['accuracy_ratio']:.3f}  "
          f"(F1 ratio {result['f1_ratio']:.3f})")
    print("\nheld-out rows (never trained on):")
    for name, rep in result["heldout"].items():
        print(f"  {name} ({rep['label']}, n={rep['n']}): judge accuracy {rep['accuracy']:.3f}, "
              f"flagged {rep['flagged_rate']:.3f}, keyword refusal rate {rep['keyword_refusal_rate']:.3f}")
    trained = "in this run" if result["retrained_in_this_run"] else "when cached"
    print(f"\ntraining {result['train_seconds']} s ({trained}, {result['threads']} threads); reload "
          f"{result['reload_seconds']:.2f} s; scoring {result['score_pairs_per_second']} pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
