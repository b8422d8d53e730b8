"""experiments.compare without training: successive halving on synthetic objectives (equal budgets, the right
trials promoted, grid-edge extension, diverged trials), and the statistics against hand-computed values and
simulated replicates (false alarms, power against the noncentral t distribution)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments.compare import stats
from experiments.compare.plan import EXTRA_POINTS, GRID, Plan
from experiments.compare.tuning import Point, extra_points, grid, tune

SIZES = (11, 3, 1)


@dataclass
class Out:
    value: float | None
    status: str
    steps: int


def objective(optimum: float, diverge_above: float = math.inf, rung_noise: dict | None = None):
    """A synthetic trial: final value (k - optimum)^2 / (rung + 1), diverged for k > diverge_above.
    `rung_noise[(rung, k)]` adds to a value, to make a rung's ranking differ from the one before."""
    def value(rung: int, p: Point) -> Out:
        if p.k > diverge_above:
            return Out(None, "diverged", 0)
        return Out((p.k - optimum) ** 2 / (rung + 1) + (rung_noise or {}).get((rung, p.k), 0.0), "finished", 0)
    return value


def run_tuning(objectives: dict, tune_keys=(), mode="min", rungs=(4, 12, 36)):
    batches = []

    def run(batch):
        batches.append(batch)
        return [objectives[o](rung, p) for o, rung, p in batch]

    sizes = list(SIZES) if not tune_keys else None
    if tune_keys:
        n0 = len(GRID) * math.prod(len(v) for _, v in tune_keys) + EXTRA_POINTS
        sizes = [n0, n0 // 3, n0 // 9]
    state = tune(list(objectives), sizes, mode, list(tune_keys), run)
    steps = {o: sum(rungs[r] for (oo, r, _) in (t for b in batches for t in b) if oo == o) for o in objectives}
    return state, batches, steps


def test_every_option_spends_the_same_steps_whatever_happens():
    """An interior optimum, one past the grid's edge, one whose every trial diverges above the default: the same
    trials per rung and the same steps for each, pruned and diverged trials included."""
    state, batches, steps = run_tuning({"interior": objective(1.3), "edge": objective(9.0),
                                        "unstable": objective(-3.0, diverge_above=0.0),
                                        "hopeless": objective(0.0, diverge_above=-100)})
    per_rung = {o: [sum(1 for (rung, _) in t.trials if rung == r) for r in range(3)] for o, t in state.items()}
    assert all(v == list(SIZES) for v in per_rung.values()), per_rung
    assert len(set(steps.values())) == 1 and steps["interior"] == 11 * 4 + 3 * 12 + 1 * 36
    # Plan.tuning_steps() says the same without running anything.
    plan = Plan.__new__(Plan)
    plan.budget, plan.tune, plan.screen = 36, [], False
    assert plan.rungs == (4, 12, 36) and plan.rung_sizes == SIZES and plan.tuning_steps() == steps["interior"]
    assert state["hopeless"].chosen is None and state["hopeless"].diverged_share() == 1.0


def test_halving_promotes_the_best_third_of_each_rung():
    # Rung 1 re-ranks: noise makes k=2 the worst of the three promoted there, so rung 2 must run k=1.
    noise = {(1, 1.0): -10.0, (1, 2.0): 5.0}
    state, batches, _ = run_tuning({"a": objective(1.6, rung_noise=noise)})
    rung0 = {p.k: o.value for (r, p), o in state["a"].trials.items() if r == 0}
    assert sorted(rung0) == sorted({*GRID, 1.5, 2.5})  # the grid's best is k=2: +- a quarter decade around it
    best3 = sorted(rung0, key=lambda k: (k - 1.6) ** 2)[:3]  # by hand: 1.5, 2.0, 1.0 (distances .1, .4, .6)
    assert best3 == [1.5, 2.0, 1.0]
    assert sorted(p.k for (r, p) in state["a"].trials if r == 1) == sorted(best3)
    assert [p.k for (r, p) in state["a"].trials if r == 2] == [1.0]  # (1-1.6)^2/2 - 10 beats 1.5's 0.005
    assert state["a"].chosen == Point(1.0) and state["a"].flag == ""


@pytest.mark.parametrize(("optimum", "extra", "flag"), [
    (9.0, [5, 6], "best on the grid's high edge: extended; the chosen LR is still on the edge"),
    (5.2, [5, 6], "best on the grid's high edge: extended"),
    (-4.6, [-5, -6], "best on the grid's low edge: extended"),
    (0.2, [-0.5, 0.5], ""),
])
def test_a_best_value_on_the_grid_edge_extends_it_once(optimum, extra, flag):
    state, batches, _ = run_tuning({"a": objective(optimum)})
    assert [p.k for _, _, p in batches[1]] == extra
    assert state["a"].flag == flag
    assert len(batches) == 4  # grid, extra points, rung 1, rung 2: the extension happens once


def test_every_grid_point_failing_extends_below_and_counts_the_diverged():
    state, batches, _ = run_tuning({"a": objective(-5.5, diverge_above=-4.5)})
    assert [p.k for _, _, p in batches[1]] == [-5, -6]
    assert state["a"].flag.startswith("every grid point failed: extended below")
    t = state["a"]
    diverged = sum(o.status == "diverged" for o in t.trials.values())
    assert diverged == 9 + 1 and len(t.trials) == 15  # the grid, and k=-4 again at rung 1 (2 trials finished)
    assert t.diverged_share() == pytest.approx(diverged / 15)
    assert t.chosen == Point(-6)


def test_extra_points_follow_the_best_tuned_value():
    rung0 = {p: Out((p.k - 1) ** 2 + (0 if dict(p.extra)["wd"] == "0.1" else 1), "finished", 0)
             for p in grid([("wd", ["0", "0.1"])])}
    extra, flag = extra_points(rung0, "min")
    assert extra == [Point(0.5, (("wd", "0.1"),)), Point(1.5, (("wd", "0.1"),))] and flag == ""
    state, batches, steps = run_tuning({"a": objective(1.0), "b": objective(-2.0)},
                                       tune_keys=[("wd", ["0", "0.1"])])
    assert [sum(1 for (r, _) in state[o].trials if r == i) for o in "ab" for i in range(3)] == [20, 6, 2] * 2
    assert steps["a"] == steps["b"]


def test_mode_max_ranks_the_largest_first():
    state, _, _ = run_tuning({"a": lambda rung, p: Out(-((p.k - 2) ** 2), "finished", 0)}, mode="max")
    assert state["a"].chosen == Point(2.0)


# -- statistics against hand-computed values ---------------------------------------------------------------------
def test_mean_std_and_t_interval():
    s = stats.describe([1.0, 2.0, 3.0, 4.0])
    # std = sqrt(((1.5^2 + .5^2) * 2) / 3) = sqrt(5/3); t(0.975, 3) = 3.182446 (tables): half-width 3.182446 *
    # 1.290994 / 2 = 2.054261
    assert (s.n, s.mean) == (4, 2.5) and s.std == pytest.approx(math.sqrt(5 / 3))
    assert (s.low, s.high) == pytest.approx((2.5 - 2.054261, 2.5 + 2.054261), abs=1e-5)
    assert math.isnan(stats.describe([7.0]).std)  # one run has no spread
    assert stats.describe([3.0, 3.0]) == stats.Summary(2, 3.0, 0.0, 3.0, 3.0)


def test_paired_t_test_on_three_pairs():
    # d = [2, 3, 4]: mean 3, sd 1, t = 3 / (1 / sqrt 3) = 5.196152 with 2 degrees of freedom. For 2 d.o.f. the t
    # distribution has F(t) = 1/2 + t / (2 sqrt(2 + t^2)): p = 1 - t / sqrt(2 + t^2) = 1 - 5.196152 / sqrt(29)
    # = 0.0350996, and t(0.975, 2) solves t / sqrt(2 + t^2) = 0.95: t = sqrt(1.805 / 0.0975) = 4.302653.
    p = stats.paired_test([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert (p.n, p.diff) == (3, 3.0)
    assert p.p == pytest.approx(1 - 5.196152 / math.sqrt(29), abs=1e-6)
    half = 4.302653 / math.sqrt(3)
    assert (p.low, p.high) == pytest.approx((3 - half, 3 + half), abs=1e-5)
    identical = stats.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert identical.p == 1.0 and stats.verdict(identical.p, identical.diff, "min") == "no detectable difference"
    shifted = stats.paired_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert shifted.p == 0.0 and stats.verdict(shifted.p, shifted.diff, "min") == "worse"


def test_vectorised_p_values_match_one_at_a_time():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    x[3] = y[3]  # identical runs
    assert stats.paired_p(x, y) == pytest.approx([stats.paired_test(a, b).p for a, b in zip(x, y, strict=True)])
    assert stats.paired_p(x, y)[3] == 1.0


def test_holm():
    # Sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.6, 0.5]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([0.02]) == [0.02]


def test_probability_of_improvement_counts_pairs():
    # option [1, 2, 3] vs baseline [2, 4, 6], lower is better: 1 beats all 3; 2 beats 4 and 6 and ties 2 (1/2);
    # 3 beats 4 and 6: 7.5 of 9 pairs. Higher is better: 1.5 of 9.
    assert stats.prob_improvement([1, 2, 3], [2, 4, 6], "min") == pytest.approx(7.5 / 9)
    assert stats.prob_improvement([1, 2, 3], [2, 4, 6], "max") == pytest.approx(1.5 / 9)


def test_verdicts():
    assert stats.verdict(0.01, -1.0, "min") == "better" and stats.verdict(0.01, 1.0, "min") == "worse"
    assert stats.verdict(0.01, 1.0, "max") == "better" and stats.verdict(0.01, -1.0, "max") == "worse"
    assert stats.verdict(0.05, -1.0, "min") == "no detectable difference"  # alpha 0.05: p must be below it


def test_time_to_target():
    steps, values, secs = [10, 20, 30], [5.0, 3.0, 2.0], [1.0, 2.0, 3.0]
    assert stats.first_hit(steps, values, secs, 3.0, "min") == stats.Hit(20, 2.0)
    assert stats.first_hit(steps, [0.1, 0.5, 0.9], secs, 0.5, "max") == stats.Hit(20, 2.0)
    assert stats.first_hit(steps, values, secs, 1.0, "min") == stats.Hit(math.inf, math.inf)
    t = stats.time_to_target([stats.Hit(20, 2.0), stats.Hit(math.inf, math.inf), stats.Hit(10, 1.0)])
    assert (t.median_step, t.median_seconds, t.hits, t.runs) == (20, 2.0, 2, 3)
    assert stats.time_to_target([stats.Hit(math.inf, math.inf)] * 2).median_step == math.inf
    assert stats.speedup(20.0, 10.0) == 2.0 and stats.speedup(20.0, math.inf) == 0.0
    assert math.isnan(stats.speedup(math.inf, 10.0))


# -- simulated replicates ----------------------------------------------------------------------------------------
def _replicates(n_options: int, delta: float, replicates: int, seeds: int = 5, seed: int = 0) -> np.ndarray:
    """Verdicts of `replicates` simulated comparisons, through the report's path (paired t p-values, Holm across
    options, verdict): each option's final metric per seed is a seed effect shared by all options (pairing) + its
    own N(0, 1) noise, and the options other than the baseline are `delta` lower (better)."""
    rng = np.random.default_rng(seed)
    shared = 3.0 * rng.normal(size=(replicates, seeds))
    base = shared + rng.normal(size=(replicates, seeds))
    options = [shared + rng.normal(size=(replicates, seeds)) - delta for _ in range(n_options - 1)]
    p = np.stack([stats.paired_p(o, base) for o in options], axis=1)  # (replicates, options)
    diff = np.stack([(o - base).mean(axis=1) for o in options], axis=1)
    return np.array([[stats.verdict(a, d, "min") for a, d in zip(stats.holm(row), drow, strict=True)]
                     for row, drow in zip(p, diff, strict=True)])


N = 4000
MC = 3 * math.sqrt(0.05 * 0.95 / N)  # three Monte-Carlo standard errors of a rate near 95%


def test_identical_options_give_no_detectable_difference():
    """A level-0.05 test calls a difference between identical options 5% of the time: with one comparison the
    rate of "no detectable difference" is 95% (within Monte-Carlo error), with three Holm keeps the whole family at
    >= 95% and each option above it."""
    one = _replicates(2, 0.0, N)[:, 0]
    assert abs(np.mean(one == "no detectable difference") - 0.95) <= MC
    assert abs(np.mean(one == "better") - np.mean(one == "worse")) <= 2 * MC  # no direction is favoured
    three = _replicates(4, 0.0, N, seed=1)
    assert np.mean((three == "no detectable difference").all(axis=1)) >= 0.95 - MC
    assert (np.mean(three == "no detectable difference", axis=0) >= 0.95).all()


def test_a_planted_difference_is_found_as_often_as_theory_says():
    """Options 2.5 better than the baseline (noise sd of a difference sqrt 2): the paired t-test's power with 5 seeds
    is P(|T| > t(0.975, 4)) for T noncentral t with 4 d.o.f. and noncentrality 2.5 / sqrt(2) * sqrt(5)."""
    nc = 2.5 / math.sqrt(2) * math.sqrt(5)
    crit = scipy_stats.t.ppf(0.975, 4)
    power = 1 - scipy_stats.nct.cdf(crit, 4, nc) + scipy_stats.nct.cdf(-crit, 4, nc)  # 0.835
    found = _replicates(2, 2.5, N, seed=2)[:, 0]
    se = math.sqrt(power * (1 - power) / N)
    assert abs(np.mean(found == "better") - power) <= 3 * se
    assert np.mean(found == "worse") < 0.002


def test_speed_up_text_says_never_when_the_median_run_misses():
    from types import SimpleNamespace

    from experiments.compare.report import speedup_text

    assert speedup_text(SimpleNamespace(baseline=False, speedup_steps=0.0, speedup_seconds=0.0)) == "never (median)"
    assert speedup_text(SimpleNamespace(baseline=False, speedup_steps=1.7, speedup_seconds=1.5)) == "1.7x (1.5x time)"
    assert speedup_text(SimpleNamespace(baseline=True, speedup_steps=math.nan, speedup_seconds=math.nan)) == "-"
