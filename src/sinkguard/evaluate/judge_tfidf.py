"""The TF-IDF + logistic-regression baseline judge, trained on the same rows as the judge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .judge_data import JudgeData
from .judge_eval import binary_metrics


def _text(row: dict) -> str:
    return f"{row['prompt']}\n[SEP]\n{row['response']}"


class TfidfScorer:
    """TF-IDF (word 1-2 grams, sublinear tf) + L2 logistic regression: P(harmful) per row."""

    def __init__(self, vectorizer, classifier) -> None:
        self.vectorizer = vectorizer
        self.classifier = classifier

    @classmethod
    def fit(cls, rows: list[dict], C: float = 4.0, seed: int = 42) -> TfidfScorer:
        """Fit on labelled rows (`prompt`, `response`, `harmful`)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        x = vectorizer.fit_transform([_text(r) for r in rows])
        classifier = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x, [bool(r["harmful"]) for r in rows])
        return cls(vectorizer, classifier)

    def score(self, rows: list[dict]) -> list[float]:
        """P(harmful) of each row."""
        if not rows:
            return []
        return self.classifier.predict_proba(self.vectorizer.transform([_text(r) for r in rows]))[:, 1].tolist()

    def metrics(self, rows: list[dict]) -> dict[str, float]:
        """`binary_metrics` of the 0.5-thresholded scores against the rows' labels."""
        return binary_metrics([bool(r["harmful"]) for r in rows], [s >= 0.5 for s in self.score(rows)])


def tfidf_baseline(data: JudgeData, cs: Sequence[float] = (0.25, 1.0, 4.0, 16.0),
                   seed: int = 42) -> dict[str, Any]:
    """TF-IDF + LR on the judge's training rows, C chosen on validation; validation and test metrics."""
    chosen, best, model = cs[0], None, None
    for c in cs:
        candidate = TfidfScorer.fit(data.train, c, seed)
        acc = candidate.metrics(data.validation)["accuracy"] if data.validation else 0.0
        if best is None or acc > best:
            chosen, best, model = c, acc, candidate
    return {"C": chosen, "validation": model.metrics(data.validation) if data.validation else None,
            "test": model.metrics(data.test), "scorer": model}
