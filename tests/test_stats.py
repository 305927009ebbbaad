"""The report's intervals and tests against values computed by hand."""

from __future__ import annotations

import math

import pytest

from sinkguard.errors import SinkguardError
from sinkguard.evaluate.stats import (
    discordant,
    holm,
    mcnemar_exact,
    mean_interval,
    rogan_gladen,
    rogan_gladen_interval,
    spearman,
    wilson_interval,
)


def test_wilson_7_of_20():
    # p = 0.35, z^2 = 3.841459: center 0.446037 / 1.192073 = 0.374172, half 0.230043 / 1.192073 = 0.192977
    lo, hi = wilson_interval(7, 20)
    assert lo == pytest.approx(0.181195, abs=1e-5)
    assert hi == pytest.approx(0.567149, abs=1e-5)


def test_wilson_zero_successes_has_a_positive_upper_bound():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(3.841459 / (10 + 3.841459), abs=1e-6)  # z^2 / (n + z^2) when k = 0


def test_mean_interval_is_the_t_interval():
    mean, lo, hi = mean_interval([10.0, 20.0, 30.0])
    half = 4.302653 * 10.0 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert mean == 20.0
    assert lo == pytest.approx(20 - half, abs=1e-4)
    assert hi == pytest.approx(20 + half, abs=1e-4)
    assert mean_interval([42.0]) == (42.0, None, None)


def test_mcnemar_exact_from_discordant_counts():
    # 2 vs 9 discordant pairs: 2 * P(X <= 2 | Bin(11, 1/2)) = 2 * (1 + 11 + 55) / 2048
    assert mcnemar_exact(2, 9) == pytest.approx(134 / 2048)
    assert mcnemar_exact(9, 2) == pytest.approx(134 / 2048)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_discordant_counts_pairs():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    assert discordant(a, b) == (2, 1)
    with pytest.raises(SinkguardError):
        discordant([True], [True, False])


def test_holm_on_a_known_vector():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_rogan_gladen_point_and_clipping():
    assert rogan_gladen(0.4, 0.8, 0.9) == pytest.approx(0.3 / 0.7)
    assert rogan_gladen(0.05, 0.8, 0.9) == 0.0  # fewer flags than the false-positive rate
    assert rogan_gladen(0.95, 0.8, 0.9) == 1.0
    with pytest.raises(SinkguardError, match="no better than chance"):
        rogan_gladen(0.4, 0.5, 0.5)


def test_rogan_gladen_interval_matches_the_delta_method():
    k, n, sens, nh, spec, ns = 120, 300, 0.8, 400, 0.9, 400
    point, lo, hi = rogan_gladen_interval(k, n, sens, nh, spec, ns, draws=40000, seed=1)
    j = sens + spec - 1
    true = (k / n + spec - 1) / j
    assert point == pytest.approx(true)
    var = ((k / n) * (1 - k / n) / n + true ** 2 * sens * (1 - sens) / nh
           + (1 - true) ** 2 * spec * (1 - spec) / ns) / j ** 2
    half = 1.959964 * math.sqrt(var)
    assert lo == pytest.approx(true - half, abs=0.01)
    assert hi == pytest.approx(true + half, abs=0.01)
    # a perfectly measured judge (huge n) leaves only the binomial uncertainty of k / n
    _, lo2, hi2 = rogan_gladen_interval(k, n, 1.0, 10 ** 9, 1.0, 10 ** 9, draws=40000, seed=1)
    assert (hi2 - lo2) < (hi - lo)


def test_spearman_fisher_interval():
    rho, lo, hi = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert rho == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    z, half = math.atanh(0.8), 1.959964 * math.sqrt(1.06 / 2)
    assert lo == pytest.approx(math.tanh(z - half), abs=1e-5)
    assert hi == pytest.approx(math.tanh(z + half), abs=1e-5)


def test_spearman_cluster_bootstrap_is_wider_for_few_groups():
    x = list(range(12))
    y = [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10]
    groups = [i // 4 for i in range(12)]
    rho, lo, hi = spearman(x, y, groups=groups, draws=500, seed=0)
    assert lo <= rho <= hi
    assert rho == pytest.approx(1 - 6 * 8 / (12 * 143))
