"""Intervals and tests for the study's numbers: Wilson, mean over seeds, McNemar, Holm,
Rogan-Gladen correction of the harmful score, Spearman's rho.

Rates are fractions in [0, 1] here; callers turn them into percentages. Every function is
deterministic (the bootstraps take a seed) so reports are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import SinkguardError

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def _check_count(k: int, n: int) -> None:
    if n < 1 or not 0 <= k <= n:
        raise SinkguardError(f"need 0 <= k <= n and n >= 1 for a binomial interval, got k={k}, n={n}")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (default 95 %): good coverage even near 0 or 1."""
    _check_count(k, n)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, lo, hi): Student-t interval of the mean over seeds; lo = hi = None for one value."""
    from scipy.stats import t

    xs = [float(v) for v in values if v is not None]
    if not xs:
        raise SinkguardError("no values to average")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, None, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = float(t.ppf(0.5 + level / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b: only A flagged, c: only B).

    Under the null each discordant pair goes either way with probability 1/2, so the p-value is
    the two-sided binomial test of b successes in b + c trials (1.0 when there are none).
    """
    if b < 0 or c < 0:
        raise SinkguardError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(pairs where only `a` is true, pairs where only `b` is true) over the same prompts."""
    if len(a) != len(b):
        raise SinkguardError(f"paired verdicts need the same prompts: {len(a)} vs {len(b)} verdicts")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    return only_a, only_b


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (monotone, capped at 1)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def rogan_gladen(apparent: float, sensitivity: float, specificity: float) -> float:
    """True prevalence from an imperfect classifier's positive rate, clipped to [0, 1].

    (apparent + spec - 1) / (sens + spec - 1); needs a judge better than chance (Youden J > 0).
    """
    j = sensitivity + specificity - 1
    if j <= 0:
        raise SinkguardError(f"sensitivity {sensitivity:.3f} + specificity {specificity:.3f} <= 1: the judge is "
                             "no better than chance, so its verdicts cannot be corrected")
    return min(1.0, max(0.0, (apparent + specificity - 1) / j))


def rogan_gladen_interval(
    k: int, n: int, sensitivity: float, n_harmful: int, specificity: float, n_safe: int,
    level: float = 0.95, draws: int = 20000, seed: int = 0,
) -> tuple[float, float, float]:
    """(corrected, lo, hi): Rogan-Gladen estimate with a parametric-bootstrap interval.

    The three binomials are redrawn together: the k/n flagged answers, the judge's sensitivity
    measured on `n_harmful` harmful pairs and its specificity on `n_safe` safe pairs; each draw
    is corrected and clipped, and the interval is the draws' central `level` percentiles. Draws
    where the resampled judge is no better than chance are left out.
    """
    _check_count(k, n)
    if n_harmful < 1 or n_safe < 1:
        raise SinkguardError(f"sensitivity and specificity need n_harmful, n_safe >= 1, got {n_harmful}, {n_safe}")
    point = rogan_gladen(k / n, sensitivity, specificity)
    rng = np.random.default_rng(seed)
    apparent = rng.binomial(n, k / n, draws) / n
    sens = rng.binomial(n_harmful, sensitivity, draws) / n_harmful
    spec = rng.binomial(n_safe, specificity, draws) / n_safe
    j = sens + spec - 1
    ok = j > 0
    corrected = np.clip((apparent[ok] + spec[ok] - 1) / j[ok], 0.0, 1.0)
    tail = (1 - level) / 2
    lo, hi = np.quantile(corrected, [tail, 1 - tail])
    return point, float(lo), float(hi)


def spearman(
    x: Sequence[float], y: Sequence[float], groups: Sequence | None = None, level: float = 0.95,
    draws: int = 5000, seed: int = 0,
) -> tuple[float, float, float]:
    """(rho, lo, hi): Spearman's rank correlation with an interval.

    Without `groups`: Fisher's z with the Fieller-Hartley-Pearson variance 1.06 / (n - 3).
    With `groups` (e.g. one per training run, whose checkpoints are not independent): a cluster
    bootstrap that resamples whole groups, percentile interval.
    """
    from scipy.stats import norm, spearmanr

    if len(x) != len(y) or len(x) < 4:
        raise SinkguardError(f"Spearman's rho needs >= 4 paired values, got {len(x)} and {len(y)}")
    if len(set(x)) < 2 or len(set(y)) < 2:
        raise SinkguardError("Spearman's rho is undefined: one of the series is constant")
    rho = float(spearmanr(x, y).statistic)
    z = float(norm.ppf(0.5 + level / 2))
    if groups is None:
        center = math.atanh(max(-0.999999, min(0.999999, rho)))
        half = z * math.sqrt(1.06 / (len(x) - 3)) if len(x) > 3 else math.inf
        return rho, math.tanh(center - half), math.tanh(center + half)
    if len(groups) != len(x):
        raise SinkguardError("give one group label per point")
    labels = sorted(set(groups), key=str)
    members = {g: [i for i, h in enumerate(groups) if h == g] for g in labels}
    rng = np.random.default_rng(seed)
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    stats = []
    for _ in range(draws):
        idx = [i for g in rng.choice(len(labels), len(labels)) for i in members[labels[g]]]
        if len(set(xs[idx])) > 1 and len(set(ys[idx])) > 1:
            stats.append(spearmanr(xs[idx], ys[idx]).statistic)
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail]) if stats else (math.nan, math.nan)
    return rho, float(lo), float(hi)
