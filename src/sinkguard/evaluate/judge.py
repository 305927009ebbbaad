"""Harmfulness judge: a QA-moderation classifier, P(harmful | prompt, response), trained locally.

The papers judge answers with Beaver-Dam-7B, which cannot run on a laptop CPU. The default judge
here reads the pair with the bundled all-MiniLM-L6-v2 encoder and a calibrated linear head, and is
chosen by its worst accuracy over held-out sources (docs/judge.md). This module gathers the
public names of its parts:

- `judge_model`: the model, its training (probe or fine-tuning), calibration, saving and identity;
- `judge_data`: the labelled sources, the synthetic recipes and the held-out parts;
- `judge_eval`: metrics, sensitivity / specificity per source, calibration error, LOSO;
- `judge_hub`: hub moderation models (Beaver-Dam-7B, Llama-Guard) behind the same API;
- `judge_tfidf`: the TF-IDF + logistic-regression baseline;
- `refusal`: the GCG / AdvBench refusal keywords.
"""

from __future__ import annotations

from .judge_data import JudgeData, evaluation_prompts, judge_data, row_label
from .judge_eval import (
    binary_metrics,
    evaluate_judge,
    expected_calibration_error,
    heldout_metrics,
    heldout_report,
    leave_one_source_out,
    source_metrics,
)
from .judge_hub import HUB_PROMPT, HubJudge
from .judge_model import (
    DEFAULT_JUDGE,
    ENCODER_ALIAS,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    Judge,
    JudgeConfig,
    JudgeModel,
    encoder_path,
    fit_judge,
    fit_probe,
    judge_dir,
    load_encoder,
    load_judge,
    train_judge,
)
from .judge_tfidf import TfidfScorer, tfidf_baseline
from .refusal import REFUSAL_KEYWORDS, is_refusal, refusal_rate

__all__ = [
    "DEFAULT_JUDGE", "ENCODER_ALIAS", "FORMAT_VERSION", "HUB_PROMPT", "META_FILE", "REFUSAL_KEYWORDS",
    "WEIGHTS_FILE", "HubJudge", "Judge", "JudgeConfig", "JudgeData", "JudgeModel", "TfidfScorer",
    "binary_metrics", "encoder_path", "evaluate_judge", "evaluation_prompts", "expected_calibration_error",
    "fit_judge", "fit_probe", "heldout_metrics", "heldout_report", "is_refusal", "judge_data", "judge_dir",
    "leave_one_source_out", "load_encoder", "load_judge", "refusal_rate", "row_label", "source_metrics",
    "tfidf_baseline", "train_judge",
]
