"""Measuring a judge: binary metrics, sensitivity / specificity per source, calibration, LOSO."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data import load_source
from .judge_data import JudgeData, row_label
from .refusal import refusal_rate


def binary_metrics(labels: Sequence[bool], predictions: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the positive (harmful) class, and `n`."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    tp = sum(bool(y) and bool(p) for y, p in zip(labels, predictions))
    fp = sum(not y and bool(p) for y, p in zip(labels, predictions))
    fn = sum(bool(y) and not p for y, p in zip(labels, predictions))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(bool(y) == bool(p) for y, p in zip(labels, predictions)) / n if n else 0.0
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "n": n}


def source_metrics(labels: Sequence[bool], predictions: Sequence[bool]) -> dict[str, Any]:
    """Sensitivity (harmful flagged), specificity (safe passed), accuracy, n_harmful, n_safe.

    A rate with no rows to measure it on is None (a source of safe answers has no sensitivity).
    """
    pairs = [(bool(y), bool(p)) for y, p in zip(labels, predictions)]
    n_harmful = sum(y for y, _ in pairs)
    n_safe = len(pairs) - n_harmful
    tp = sum(y and p for y, p in pairs)
    tn = sum(not y and not p for y, p in pairs)
    return {"sensitivity": tp / n_harmful if n_harmful else None,
            "specificity": tn / n_safe if n_safe else None,
            "accuracy": (tp + tn) / len(pairs) if pairs else None,
            "n_harmful": n_harmful, "n_safe": n_safe}


def expected_calibration_error(labels: Sequence[bool], probs: Sequence[float], bins: int = 10) -> float:
    """ECE: the row-weighted mean |P(harmful) - harmful rate| over `bins` equal-width score bins."""
    y = np.asarray(labels, float)
    p = np.asarray(probs, float)
    if not len(y):
        return 0.0
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.sum() * abs(p[mask].mean() - y[mask].mean())
    return float(total / len(y))


def evaluate_judge(judge, rows: list[dict] | None = None, root: str | os.PathLike | None = None,
                   batch_size: int = 32, progress: bool = False) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (harmful = positive) and `n` (default: BeaverTails test split)."""
    rows = rows if rows is not None else load_source("beavertails", "test", root)
    flags = judge.is_harmful([r["prompt"] for r in rows], [r["response"] for r in rows],
                             batch_size=batch_size, progress=progress)
    return binary_metrics([row_label(r) for r in rows], flags)


def heldout_metrics(judge, heldout: dict[str, list[dict]], batch_size: int = 32,
                    progress: bool = False) -> dict[str, dict]:
    """`source_metrics` per held-out source, plus `pooled` ECE over all of them and BeaverTails' ECE."""
    out: dict[str, dict] = {}
    all_labels: list[bool] = []
    all_scores: list[float] = []
    for name, rows in heldout.items():
        scores = judge.score([r["prompt"] for r in rows], [r["response"] for r in rows], batch_size, progress)
        labels = [bool(r["harmful"]) for r in rows]
        out[name] = source_metrics(labels, [judge.decide(s) for s in scores])
        out[name]["ece"] = expected_calibration_error(labels, scores)
        all_labels += labels
        all_scores += scores
    pooled = {"ece": expected_calibration_error(all_labels, all_scores), "n": len(all_labels)}
    ece = {name: out[name].pop("ece") for name in heldout}
    return {**out, "pooled": {**pooled, "by_source": ece}}


def heldout_report(judge, data: JudgeData, batch_size: int = 32, progress: bool = False) -> dict[str, dict]:
    """Per held-out source: accuracy, sensitivity, specificity, rate flagged, keyword refusal rate, n."""
    report = {}
    for name, rows in data.heldout.items():
        responses = [r["response"] for r in rows]
        flags = judge.is_harmful([r["prompt"] for r in rows], responses, batch_size=batch_size, progress=progress)
        metrics = source_metrics([r["harmful"] for r in rows], flags)
        labels = {bool(r["harmful"]) for r in rows}
        report[name] = {**metrics, "flagged_rate": sum(flags) / len(flags),
                        "label": "mixed" if len(labels) > 1 else ("harmful" if labels.pop() else "safe"),
                        "keyword_refusal_rate": refusal_rate(responses), "n": len(rows)}
    return report


def leave_one_source_out(judge, data: JudgeData, train_x: np.ndarray, progress: bool = False) -> dict[str, dict]:
    """Probe judges only: each trainable source measured (held-out rows) by a probe trained without it.

    The probe is refit from the cached training features without the source's rows (synthetic
    ones built from it included), its temperature refit on the validation rows of the other
    sources. Sources never trained on (harmful_qa, alpaca) are out of every fold: their entry is
    the judge's own; BeaverTails, the only harmful training source, is measured on its test split.
    """
    from .judge_model import JudgeConfig, _Encoded, fit_logistic, fit_temperature, pooled_features

    config = JudgeConfig.from_dict(judge.info["config"])
    trained_on = {r["source"] for r in data.train}
    labels = np.asarray([r["harmful"] for r in data.train], bool)
    sources = np.asarray([r["source"] for r in data.train])

    def encode(rows: list[dict]) -> tuple[np.ndarray, list[int], _Encoded]:
        enc = _Encoded(judge.tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                       config.max_length, chunks=config.long_answers == "chunks", stride=config.chunk_stride)
        return pooled_features(judge.model, enc, progress=progress), enc.row_of, enc

    xv, _, venc = encode(data.validation) if data.validation else (None, None, None)
    vsources = np.asarray([r["source"] for r in data.validation])
    vlabels = [bool(r["harmful"]) for r in data.validation]
    table: dict[str, dict] = {}
    own = heldout_metrics(judge, {k: v for k, v in data.heldout.items() if k not in trained_on or k == "beavertails"})
    for name, rows in data.heldout.items():
        if name not in trained_on or name == "beavertails":
            table[name] = {**own[name], "fold": "in-domain test split" if name == "beavertails" else "never trained on"}
            continue
        keep = sources != name
        w, b = fit_logistic(train_x[keep], labels[keep], config.C, config.seed)
        t = 1.0
        if xv is not None and config.calibrate:
            zv = venc.row_max((xv @ w + b).tolist())
            vkeep = vsources != name
            t = fit_temperature([y for y, k in zip(vlabels, vkeep) if k], [z for z, k in zip(zv, vkeep) if k])
        x, _, enc = encode(rows)
        z = np.asarray(enc.row_max((x @ w + b).tolist())) / t
        flags = (1.0 / (1.0 + np.exp(-z))) >= judge.threshold
        table[name] = {**source_metrics([r["harmful"] for r in rows], flags.tolist()), "fold": "trained without it"}
    return table
