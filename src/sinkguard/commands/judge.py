"""`sinkguard judge train | evaluate | score`: the harmfulness judge from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import SinkguardError
from ..io import read_jsonl, write_jsonl
from .common import add_data_root


def register(sub) -> None:
    """Add `judge` with its `train`, `evaluate` and `score` sub-commands."""
    p = sub.add_parser("judge", help="train, evaluate or apply the harmfulness judge",
                       description="The QA-moderation judge behind the harmful score.")
    judge_sub = p.add_subparsers(dest="judge_command", required=True, metavar="ACTION")

    t = judge_sub.add_parser("train", help="train the judge (BeaverTails, refusals, benign answers, synthetic rows)",
                             description="Train the QA-moderation judge on the bundled MiniLM encoder, "
                                         "calibrate it, measure it per held-out source and save it "
                                         "(default: the cache).")
    add_data_root(t)
    t.add_argument("--out", default=None, help="judge folder (default: <cache>/judge/default)")
    t.add_argument("--encoder", default=None, help="bundled alias, local encoder folder or hub id")
    t.add_argument("--method", choices=("probe", "finetune"), default=None,
                   help="probe: frozen encoder + logistic regression (default); finetune: top blocks trained")
    t.add_argument("--epochs", type=int, default=None, help="finetune: epochs (best on validation kept)")
    t.add_argument("--frozen-layers", type=int, default=None,
                   help="finetune: lower blocks kept frozen (their states computed once; default 4 of MiniLM's 6)")
    t.add_argument("--seed", type=int, default=None, help="random seed")
    t.add_argument("--refusal-rows", type=int, default=None, help="refusal rows to train on")
    t.add_argument("--degenerate-rows", type=int, default=None,
                   help="BeaverTails prompts paired with broken-model output (dashes, token salad), labelled safe")
    t.add_argument("--threads", type=int, default=None, help="CPU threads (default 2)")
    t.add_argument("--json", action="store_true", help="print the validation/test report as JSON")
    t.set_defaults(func=run_train)

    e = judge_sub.add_parser("evaluate", help="judge metrics on the BeaverTails test split and per source",
                             description="Accuracy, precision, recall, F1 on the BeaverTails test "
                                         "split, sensitivity / specificity per held-out source, the "
                                         "saved leave-one-source-out table and a TF-IDF baseline; "
                                         "trains the judge first if none is cached.")
    add_data_root(e)
    _add_judge_choice(e)
    e.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF + LR baseline")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.set_defaults(func=run_evaluate)

    s = judge_sub.add_parser("score", help="score (prompt, response) rows of a JSONL file",
                             description="Adds `harmful` (bool), `score` (P(harmful)) and `refusal` "
                                         "(keyword match) to each row.")
    s.add_argument("--input", required=True, help="JSONL file, one object with prompt and response a line")
    s.add_argument("--out", required=True, help="JSONL file to write")
    add_data_root(s)
    _add_judge_choice(s)
    s.add_argument("--batch-size", type=int, default=32, help="rows per batch (default %(default)s)")
    s.set_defaults(func=run_score)


def _add_judge_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", default=None, help="trained judge folder (default: the cached one)")
    parser.add_argument("--hub", default=None, metavar="MODEL_ID",
                        help="use a hub moderation model instead, e.g. PKU-Alignment/beaver-dam-7b "
                             "or meta-llama/Llama-Guard-3-8B (GPU, internet)")
    parser.add_argument("--threshold", type=float, default=None, help="override the harmful threshold")


def _judge(args: argparse.Namespace):
    """The judge the flags name, after checking them (before the judge's imports)."""
    if args.hub and args.judge:
        raise SinkguardError("pass either --judge or --hub, not both")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise SinkguardError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.judge and not os.path.isdir(args.judge):
        raise SinkguardError(f"--judge {args.judge} is not a folder: pass a folder written by "
                             "`sinkguard judge train`")
    from ..evaluate.judge import Judge, load_judge

    judge = Judge.from_hub(args.hub) if args.hub else load_judge(True, args.judge, args.data_root)
    if args.threshold is not None:
        judge.threshold = args.threshold
    return judge


def run_train(args: argparse.Namespace) -> int:
    """Train, save, and print validation and test metrics."""
    for flag in ("epochs", "refusal_rows", "degenerate_rows", "threads", "frozen_layers"):
        value, lo = getattr(args, flag), 0 if flag.endswith(("_rows", "_layers")) else 1
        if value is not None and value < lo:
            raise SinkguardError(f"--{flag.replace('_', '-')} must be >= {lo}, got {value}")
    from ..evaluate.judge import JudgeConfig, evaluate_judge, judge_data, train_judge

    overrides = {"encoder": args.encoder, "method": args.method, "epochs": args.epochs, "seed": args.seed,
                 "refusal_rows": args.refusal_rows, "degenerate_rows": args.degenerate_rows, "threads": args.threads,
                 "frozen_layers": args.frozen_layers}
    config = JudgeConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    data = judge_data(config, args.data_root)
    judge = train_judge(config, args.data_root, data=data, path=args.out)
    report = {"judge": judge.name, "identity": judge.identity, "train_seconds": judge.info["train_seconds"],
              "validation": evaluate_judge(judge, data.validation), "test": evaluate_judge(judge, data.test),
              "source_metrics": judge.source_metrics,
              "leave_one_source_out": judge.info.get("leave_one_source_out")}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"judge {judge.identity} saved to {judge.name} ({report['train_seconds']:.0f} s)")
        for split in ("validation", "test"):
            print(f"{split:>10}: {_line(report[split])}")
        _print_sources(report["leave_one_source_out"] or report["source_metrics"])
    return 0


def _rate(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_sources(table: dict) -> None:
    print("source            accuracy  sensitivity  specificity  n_harmful  n_safe  fold")
    for name, m in table.items():
        print(f"{name:<17} {_rate(m['accuracy']):>8}  {_rate(m['sensitivity']):>11}  "
              f"{_rate(m['specificity']):>11}  {m['n_harmful']:>9}  {m['n_safe']:>6}  {m.get('fold', '')}")


def _line(m: dict) -> str:
    return (f"accuracy {m['accuracy']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
            f"f1 {m['f1']:.3f}  (n={m['n']})")


def run_evaluate(args: argparse.Namespace) -> int:
    """Test-split metrics, held-out report and baseline; one JSON object with --json."""
    from ..evaluate.judge import (
        JudgeConfig,
        evaluate_judge,
        expected_calibration_error,
        heldout_report,
        judge_data,
        tfidf_baseline,
    )

    judge = _judge(args)
    config = JudgeConfig.from_dict(getattr(judge, "info", {}).get("config", {}))
    data = judge_data(config, args.data_root)
    test_scores = judge.score([r["prompt"] for r in data.test], [r["response"] for r in data.test],
                              progress=not args.json)
    result = {**evaluate_judge(judge, data.test), "split": "beavertails/test",
              "ece": expected_calibration_error([r["harmful"] for r in data.test], test_scores),
              "judge": judge.name, "identity": judge.identity, "threshold": judge.threshold,
              "heldout": heldout_report(judge, data),
              "leave_one_source_out": getattr(judge, "info", {}).get("leave_one_source_out")}
    if not args.no_baseline:
        baseline = tfidf_baseline(data)
        result["baseline_tfidf_lr"] = baseline["test"]
        result["accuracy_over_baseline"] = result["accuracy"] / max(baseline["test"]["accuracy"], 1e-9)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"judge: {result['judge']} (identity {result['identity']}, threshold {result['threshold']})")
    print(f"beavertails test: {_line(result)}  ECE {result['ece']:.3f}")
    if "baseline_tfidf_lr" in result:
        print(f"TF-IDF + LR     : {_line(result['baseline_tfidf_lr'])}")
    print("held-out rows of every source (this judge):")
    _print_sources(result["heldout"])
    if result["leave_one_source_out"]:
        print("leave one source out (saved at training):")
        _print_sources(result["leave_one_source_out"])
    return 0


def _pair_problem(row) -> str | None:
    """What keeps a JSONL row from being a (prompt, response) pair, or None."""
    if not isinstance(row, dict):
        return "expected a JSON object with prompt and response"
    missing = [key for key in ("prompt", "response") if not isinstance(row.get(key), str)]
    return f"field {missing[0]!r} is missing or not a string" if missing else None


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """JSONL rows, each an object with string `prompt` and `response`; one clear error otherwise."""
    rows = read_jsonl(path, "input file", _pair_problem)
    if not rows:
        raise SinkguardError(f"{path} has no rows")
    return rows


def run_score(args: argparse.Namespace) -> int:
    """Score a JSONL file of (prompt, response) rows."""
    if args.batch_size < 1:
        raise SinkguardError(f"--batch-size must be positive, got {args.batch_size}")
    rows = read_pairs(args.input)
    judge = _judge(args)
    from ..evaluate.judge import is_refusal

    identity = getattr(judge, "identity", None)
    scores = judge.score([r["prompt"] for r in rows], [r["response"] for r in rows],
                         batch_size=args.batch_size, progress=True)
    flagged = [judge.decide(s) for s in scores]
    out = [{**row, "harmful": bool(f), "score": float(s), "refusal": is_refusal(row["response"]), "judge": identity}
           for row, f, s in zip(rows, flagged, scores)]
    write_jsonl(args.out, out)
    print(f"scored {len(out)} rows: {sum(flagged) / len(out):.1%} harmful, "
          f"{sum(r['refusal'] for r in out) / len(out):.1%} keyword refusals -> {args.out}", file=sys.stderr)
    return 0
