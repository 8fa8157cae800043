"""Is a difference between two arms real? Paired bootstrap intervals and McNemar's test.

Both arms answered the same samples, so every statistic here is paired by sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from math import comb

import numpy as np

__all__ = ["paired_bootstrap", "mcnemar"]


def paired_bootstrap(
    delta: Callable[[np.ndarray], float],
    n: int,
    reps: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    clusters: Sequence | None = None,
) -> tuple[float, float]:
    """Percentile interval of a paired difference.

    Args:
        delta: ``delta(indices) -> float``: the arm's metric minus the baseline's, both
            computed on the samples at ``indices`` (int64 array, with repeats).
        n: number of samples.
        reps: bootstrap resamples.
        seed: seeds numpy's generator (same seed, same interval).
        level: coverage of the interval.
        clusters: optional per-sample cluster label (length n); whole clusters are then
            resampled (for metrics over groups, such as HallusionBench's fAcc and qAcc).

    Returns:
        ``(lo, hi)``, the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled
        deltas (resamples where ``delta`` is NaN are left out).
    """
    if n < 1:
        raise ValueError("paired_bootstrap needs at least one sample")
    rng = np.random.default_rng(seed)
    members = None
    if clusters is not None:
        if len(clusters) != n:
            raise ValueError(f"{len(clusters)} cluster labels for {n} samples")
        by_label: dict = {}
        for i, label in enumerate(clusters):
            by_label.setdefault(label, []).append(i)
        members = [np.array(v) for v in by_label.values()]
    values = np.empty(reps)
    for r in range(reps):
        if members is None:
            values[r] = delta(rng.integers(0, n, n))
        else:
            picks = rng.integers(0, len(members), len(members))
            values[r] = delta(np.concatenate([members[p] for p in picks]))
    lo, hi = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar(baseline: Sequence[bool], arm: Sequence[bool]) -> tuple[float, int, int]:
    """Exact two-sided McNemar test of paired right/wrong outcomes.

    Returns:
        ``(p_value, fixed, broken)``: ``fixed`` samples the baseline got wrong and the arm
        right, ``broken`` the reverse; p = min(1, 2 P(X <= min(fixed, broken))) for
        X ~ Binomial(fixed + broken, 1/2), computed exactly (1.0 when both are 0).
    """
    if len(baseline) != len(arm):
        raise ValueError(f"{len(baseline)} baseline outcomes for {len(arm)} arm outcomes")
    fixed = sum(1 for b, a in zip(baseline, arm) if not b and a)
    broken = sum(1 for b, a in zip(baseline, arm) if b and not a)
    total = fixed + broken
    if total == 0:
        return 1.0, 0, 0
    tail = Fraction(sum(comb(total, k) for k in range(min(fixed, broken) + 1)), 2**total)
    return float(min(Fraction(1), 2 * tail)), fixed, broken
