"""95% intervals for the eval tables: Wilson's score interval for accuracies (every score 0 or 1), the normal
approximation of the mean (clipped to [0, 1]) for graded scores (F1, the share of answers found, ...)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054   # the two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``(nan, nan)`` for ``n == 0``)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(scores: list[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of the mean of ``scores`` in [0, 1] (sample standard deviation)."""
    n = len(scores)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(scores) / n
    if n == 1:
        return 0.0, 1.0                       # one graded sample says nothing about the spread
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    half = z * math.sqrt(var / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def score_interval(scores: list[float]) -> tuple[float, float, str]:
    """``(low, high, kind)``: Wilson (``kind="wilson"``) when every score is 0 or 1, else the normal one."""
    if all(s in (0, 1) for s in scores):
        return (*wilson_interval(int(sum(scores)), len(scores)), "wilson")
    return (*mean_interval(list(scores)), "normal")


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p for two caches scored on the same prompts: ``wins`` prompts only the first answers,
    ``losses`` only the second (the binomial test of ``wins`` out of ``wins + losses`` at 1/2; 1.0 when none
    differ). The accuracy docs' paired comparisons use it."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(first: dict, second: dict, ids=None, lower_is_better: bool = False) -> tuple[int, int, float]:
    """``(wins, losses, p)`` of two runs on the same prompts (``{prompt id: value}``, over ``ids`` or the ids both
    hold): ``wins`` prompts where ``first`` is better, ``losses`` where ``second`` is (ties count for neither), and
    :func:`mcnemar_exact`'s p. Scores (0/1 answers) are better higher; with ``lower_is_better`` (e.g. answer NLL) the
    same counts are the sign test's."""
    ids = sorted(set(first) & set(second)) if ids is None else list(ids)
    sign = -1 if lower_is_better else 1
    wins = sum(sign * (first[i] - second[i]) > 0 for i in ids)
    losses = sum(sign * (first[i] - second[i]) < 0 for i in ids)
    return wins, losses, mcnemar_exact(wins, losses)
