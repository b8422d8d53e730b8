"""The statistics of a comparison, from scipy.stats: nothing here writes a distribution by hand.

Per option, over its seed runs: mean, standard deviation (ddof=1) and the 95% confidence interval of the mean
(Student's t, `scipy.stats.t.interval`).

Against the baseline, over the paired seeds (seed k of every option starts from the same weights and sees the
same batches): the **paired t-test** (`scipy.stats.ttest_rel`) and the 95% interval of the mean difference,
Holm-corrected across options. Why t and not Wilcoxon's signed-rank test: with n pairs the smallest two-sided
p-value the exact signed-rank test can reach is 2 / 2^n, 0.0625 for the default 5 seeds, so it could never call a
difference at alpha = 0.05 whatever the data (and less so after Holm's correction). The t-test assumes normal
paired differences, which fits seed-to-seed noise of an averaged validation metric; it uses the size of each
difference, which is what the few seeds a CPU allows can afford. Identical results (every difference 0) have no
spread and give p = 1; a constant non-zero difference gives p = 0.

Holm's step-down correction (Holm 1979, "A simple sequentially rejective multiple test procedure") is written
here: scipy.stats offers only Benjamini-Hochberg/Yekutieli (`false_discovery_control`), which bound the false
discovery rate, not the family-wise error a verdict per option needs.

Verdict at alpha = 0.05: "better" or "worse" (by the sign of the mean difference and the task's monitor mode) when
the Holm-adjusted p-value is below alpha, else "no detectable difference". An option with fewer than two finished
pairs has no test: no p-value, no verdict, and no share of the correction.

Probability of improvement (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice", 2108.13264):
P(X better than Y) for a random run X of the option and Y of the baseline, ties counting one half, i.e. the
Mann-Whitney U statistic over n*m (`scipy.stats.mannwhitneyu`).

Time to target (AlgoPerf, Dahl et al. 2306.07179): the first evaluated step, and the training seconds at it
(evaluation excluded), at which a run's validation metric reaches the target; a miss is infinite. Per option: the
median over seeds, the hit rate, and the speed-up over the baseline (baseline median / option median). The default
target is the best evaluation of the baseline's median run: an actual run's value, so that run reaches it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

ALPHA = 0.05
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float
    low: float  # the confidence interval of the mean
    high: float


def describe(values: Sequence[float]) -> Summary:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if std == 0:
        return Summary(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=std / math.sqrt(n))
    return Summary(n, mean, std, float(low), float(high))


@dataclass(frozen=True)
class Paired:
    n: int  # pairs (seeds where both runs finished)
    diff: float  # mean of option - baseline
    low: float  # the confidence interval of the mean difference
    high: float
    p: float  # two-sided, before the correction


def paired_p(option: ArrayLike, baseline: ArrayLike) -> np.ndarray:
    """Two-sided p-values of the paired t-test along the last axis (one comparison per row). Pairs without spread:
    1 when every difference is 0 (identical runs), 0 for a constant non-zero shift."""
    x, y = np.asarray(option, dtype=float), np.asarray(baseline, dtype=float)
    d = x - y
    flat = np.all(d == d[..., :1], axis=-1)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 on the rows replaced below
        p = stats.ttest_rel(x, y, axis=-1).pvalue
    return np.where(flat, np.where(d[..., 0] == 0, 1.0, 0.0), p)


def paired_test(option: Sequence[float], baseline: Sequence[float]) -> Paired:
    x, y = np.asarray(option, dtype=float), np.asarray(baseline, dtype=float)
    d = x - y
    n = len(d)
    if n < 2:
        return Paired(n, float(d.mean()) if n else math.nan, math.nan, math.nan, math.nan)
    p = float(paired_p(x, y))
    if np.all(d == d[0]):  # no spread: the interval is the point
        return Paired(n, float(d[0]), float(d[0]), float(d[0]), p)
    ci = stats.ttest_rel(x, y).confidence_interval(CONFIDENCE)
    return Paired(n, float(d.mean()), float(ci.low), float(ci.high), p)


def holm(pvalues: Sequence[float | None]) -> list[float]:
    """Holm-adjusted p-values over the m tests that ran: the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). A missing p (no test ran) stays nan and is not one of the m."""
    ran = [i for i, v in enumerate(pvalues) if v is not None and math.isfinite(v)]
    m = len(ran)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(ran, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adjusted[i] = running
    return adjusted


def better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def verdict(p_holm: float, diff: float, mode: str, alpha: float = ALPHA) -> str:
    if not math.isfinite(p_holm):
        return "no test"
    if p_holm >= alpha or diff == 0:
        return "no detectable difference"
    return "better" if better(diff, 0.0, mode) else "worse"


def prob_improvement(option: Sequence[float], baseline: Sequence[float], mode: str) -> float:
    x, y = np.asarray(option, dtype=float), np.asarray(baseline, dtype=float)
    if len(x) == 0 or len(y) == 0:
        return math.nan
    if mode == "min":  # lower is better: count x < y
        x, y = -x, -y
    u = stats.mannwhitneyu(x, y, alternative="two-sided").statistic  # #(x > y) + ties / 2
    return float(u) / (len(x) * len(y))


def median_run(bests: Sequence[float], mode: str) -> float | None:
    """The median of the runs' best values, taken as an actual run's value: of an even count the worse of the two
    middle ones (the mean of the two would be reached by only half the runs, so the median time to it is never)."""
    if not bests:
        return None
    ordered = sorted(bests)
    return float(ordered[len(ordered) // 2] if mode == "min" else ordered[(len(ordered) - 1) // 2])


@dataclass(frozen=True)
class Hit:
    step: float  # the first evaluated step at which the target was reached; inf: never
    seconds: float  # training seconds at that step (evaluation excluded); inf: never


def first_hit(steps: Sequence[int], values: Sequence[float], seconds: Sequence[float], target: float,
              mode: str) -> Hit:
    for s, v, t in zip(steps, values, seconds, strict=True):
        if v is not None and math.isfinite(v) and (v <= target if mode == "min" else v >= target):
            return Hit(float(s), float(t))
    return Hit(math.inf, math.inf)


@dataclass(frozen=True)
class TimeToTarget:
    median_step: float
    median_seconds: float
    hit_rate: float
    hits: int
    runs: int


def time_to_target(hits: Sequence[Hit]) -> TimeToTarget:
    if not hits:
        return TimeToTarget(math.inf, math.inf, 0.0, 0, 0)
    n_hit = sum(math.isfinite(h.step) for h in hits)
    return TimeToTarget(float(np.median([h.step for h in hits])), float(np.median([h.seconds for h in hits])),
                        n_hit / len(hits), n_hit, len(hits))


def speedup(baseline: float, option: float) -> float:
    """baseline / option for medians that may be infinite: nan when the baseline never got there."""
    if not math.isfinite(baseline):
        return math.nan
    if not math.isfinite(option):
        return 0.0
    return baseline / option if option > 0 else math.inf
