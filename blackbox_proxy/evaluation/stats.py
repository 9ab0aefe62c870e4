"""Statistics of an evaluation: bootstrap confidence intervals and paired tests between systems.

- :func:`bootstrap_ci`: the percentile bootstrap (Efron & Tibshirani 1993, §13.3) of a mean.
- :func:`mcnemar_exact`: the exact McNemar test on paired correct/incorrect outcomes
  (McNemar 1947; the exact form is a two-sided binomial test on the discordant pairs).
- :func:`paired_bootstrap`: the mean paired difference of a continuous metric, its percentile
  interval, and a two-sided p-value from the bootstrap distribution shifted to the null
  (Efron & Tibshirani 1993, §16.4: the p-value counts resampled differences at least as far
  from the observed one as the observed one is from 0).

Pure functions: every resampling draws from ``numpy.random.default_rng(seed)``, so the same seed
gives the same interval. Left out: multiple-comparison corrections (the report lists raw p-values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
_BLOCK = 1_000  # resamples drawn at once (memory: BLOCK x n indices)


def _check(values: Sequence[float], confidence: float, resamples: int) -> np.ndarray:
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"need a non-empty list of numbers, got {len(data)} values")
    if not np.isfinite(data).all():
        raise ValueError("the values must be finite numbers; leave undefined items out")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    return data


def _resampled_means(data: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = data.size
    means = np.empty(resamples)
    for start in range(0, resamples, _BLOCK):
        size = min(_BLOCK, resamples - start)
        means[start:start + size] = data[rng.integers(0, n, size=(size, n))].mean(axis=1)
    return means


def bootstrap_ci(values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap interval.

    >>> mean, low, high = bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1], seed=0)
    >>> mean, low <= mean <= high, (low, high) == bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1], seed=0)[1:]
    (0.75, True, True)
    """
    data = _check(values, confidence, resamples)
    means = _resampled_means(data, resamples, seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(data.mean()), float(low), float(high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value. ``b``: pairs where only the first system is right,
    ``c``: only the second; under the null each discordant pair is a fair coin, so
    p = min(1, 2 · P[Binomial(b + c, 1/2) <= min(b, c)]).

    >>> mcnemar_exact(1, 9)  # 2 * (1 + 10) / 2**10
    0.021484375
    >>> mcnemar_exact(0, 0), mcnemar_exact(5, 5)
    (1.0, 1.0)
    """
    if min(b, c) < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"b and c must be counts >= 0, got {b!r} and {c!r}")
    n = int(b + c)
    if n == 0:
        return 1.0
    k = int(min(b, c))
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE,
                     resamples: int = RESAMPLES, seed: int = 0) -> dict[str, float]:
    """Paired comparison of two systems' per-item values (item i of ``a`` with item i of ``b``):
    ``diff`` = mean(b − a), its interval ``low``/``high``, and the two-sided p-value
    (1 + #{|d* − diff| >= |diff|}) / (resamples + 1) of the shifted bootstrap.

    >>> r = paired_bootstrap([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5], seed=0)
    >>> r["diff"], r["low"], r["high"], r["p"] < 0.001
    (0.5, 0.5, 0.5, True)
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = _check([y - x for x, y in zip(a, b)], confidence, resamples)
    means = _resampled_means(d, resamples, seed)
    diff = float(d.mean())
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    if np.allclose(d, diff):  # no spread: the difference is certain (or there is none)
        p = 1.0 if diff == 0 else 1 / (resamples + 1)
    else:
        p = (1 + int(np.sum(np.abs(means - diff) >= abs(diff)))) / (resamples + 1)
    return {"diff": diff, "low": float(low), "high": float(high), "p": min(1.0, p)}
