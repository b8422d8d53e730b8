"""Equal-budget learning-rate tuning by successive halving.

Successive halving (Jamieson & Talwalkar, 1502.07943; the bracket Hyperband repeats, Li et al. 1603.06560): every
setting runs on a small budget, the best 1/eta go on to eta times the budget, and so on. Here, per option:

    rung 0: the grid (9 LR points, 10^-2 .. 10^2 x the option's default, times the --tune values) plus 2 points,
            each a run of 1/9 of the budget
    rung 1: the best floor(n0 / 3), each a run of 1/3 of the budget
    rung 2: the best floor(n1 / 3), each a full run; the best of these is the option's setting
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

from experiments.compare.plan import EXTRA_POINTS, GRID, RUNG_FRACTIONS


@dataclass(frozen=True, order=True)
class Point:
    """A setting: the LR at the option's default x 10^(k/2), and the --tune keys' values."""

    k: float
    extra: tuple[tuple[str, str], ...] = ()


class Outcome(Protocol):
    value: float | None  # the final monitored validation metric; None when the trial failed or diverged
    status: str  # finished | diverged | failed


@dataclass
class Tuning:
    """What tuning one option gave: every trial by (rung, point), the flag, the chosen setting."""

    trials: dict[tuple[int, Point], Any] = field(default_factory=dict)
    flag: str = ""
    chosen: Point | None = None
    chosen_rung: int | None = None  # the rung whose trial chose it: below the last, it never ran the full budget

    def diverged_share(self) -> float:
        return sum(o.status == "diverged" for o in self.trials.values()) / max(1, len(self.trials))

    def failed_share(self) -> float:
        return sum(o.status == "failed" for o in self.trials.values()) / max(1, len(self.trials))


def grid(tune: Sequence[tuple[str, Sequence[str]]]) -> list[Point]:
    combos = itertools.product(*[[(key, v) for v in values] for key, values in tune])
    return [Point(k, tuple(extra)) for extra in combos for k in GRID]


def rank(results: dict[Point, Outcome], mode: str) -> list[Point]:
    """Best first: finished trials by value (mode min or max), then the others; ties by the lower LR."""
    sign = 1.0 if mode == "min" else -1.0

    def order(p: Point) -> tuple:
        o = results[p]
        ok = o.status == "finished" and o.value is not None and math.isfinite(o.value)
        return (0, sign * o.value, p) if ok else (1, 0.0, p)

    return sorted(results, key=order)


def finished(o: Outcome) -> bool:
    return o.status == "finished" and o.value is not None and math.isfinite(o.value)


def extra_points(rung0: dict[Point, Outcome], mode: str) -> tuple[list[Point], str]:
    """The 2 points added to rung 0 once the grid has run, and the flag to report."""
    best = rank(rung0, mode)[0]
    ks = sorted({p.k for p in rung0})
    lo, hi = ks[0], ks[-1]
    below = [Point(lo - i, best.extra) for i in range(1, EXTRA_POINTS + 1)]
    if not finished(rung0[best]):  # most likely every LR was too large: look lower
        return below, "every grid point failed: extended below"
    if best.k == lo:
        return below, "best on the grid's low edge: extended"
    if best.k == hi:
        return [Point(hi + i, best.extra) for i in range(1, EXTRA_POINTS + 1)], "best on the grid's high edge: extended"
    return [Point(best.k - 0.5, best.extra), Point(best.k + 0.5, best.extra)], ""


Batch = list[tuple[str, int, Point]]  # (option, rung, point)


def tune(options: Sequence[str], sizes: Sequence[int], mode: str, tune_keys: Sequence[tuple[str, Sequence[str]]],
         run: Callable[[Batch], list[Outcome]]) -> dict[str, Tuning]:
    """Successive halving for every option at once (each phase is one batch across options, so parallel workers
    stay busy). `run` runs a batch of trials and returns their outcomes in order."""
    state = {o: Tuning() for o in options}
    points = grid(tune_keys)

    def phase(batch: Batch) -> None:
        for (option, rung, point), outcome in zip(batch, run(batch), strict=True):
            state[option].trials[(rung, point)] = outcome

    phase([(o, 0, p) for o in options for p in points])
    batch = []
    for o in options:
        extra, flag = extra_points({p: state[o].trials[(0, p)] for p in points}, mode)
        state[o].flag = flag
        batch += [(o, 0, p) for p in extra if (0, p) not in state[o].trials]
    phase(batch)
    for rung in range(1, len(sizes)):
        batch = []
        for o in options:
            below = {p: out for (r, p), out in state[o].trials.items() if r == rung - 1}
            batch += [(o, rung, p) for p in rank(below, mode)[: sizes[rung]]]
        phase(batch)
    for o in options:
        t = state[o]
        t.chosen_rung, t.chosen = choose(t, len(sizes), mode) or (None, None)
        edge = {p.k for (r, p) in t.trials if r == 0}
        if t.chosen is not None and t.flag and t.chosen.k in (min(edge), max(edge)):
            t.flag += "; the chosen LR is still on the edge"
        if t.chosen_rung is not None and t.chosen_rung < len(sizes) - 1:
            t.flag = "; ".join(filter(None, [t.flag, short_of_budget(t, len(sizes))]))
    return state


def choose(tuning: Tuning, n_rungs: int, mode: str) -> tuple[int, Point] | None:
    """The best finished trial of the highest rung, with that rung; a setting that failed at a higher rung is not
    taken from a lower one. None when nothing finished."""
    failed_higher: set[Point] = set()
    for rung in reversed(range(n_rungs)):
        results = {p: o for (r, p), o in tuning.trials.items() if r == rung}
        for p in rank(results, mode):
            if finished(results[p]) and p not in failed_higher:
                return rung, p
        failed_higher |= {p for p, o in results.items() if not finished(o)}
    return None


def short_of_budget(tuning: Tuning, n_rungs: int) -> str:
    """The flag of a setting chosen below the last rung: no full-budget trial finished, so the final runs are its
    first at the full budget."""
    ended = Counter(o.status for (r, _), o in tuning.trials.items() if r == n_rungs - 1)
    share = RUNG_FRACTIONS[tuning.chosen_rung] if n_rungs == len(RUNG_FRACTIONS) else None
    fraction = f" ({Fraction(share).limit_denominator(100)} of the budget)" if share else ""
    return (f"no full-budget tuning trial finished ({', '.join(f'{n} {s}' for s, n in sorted(ended.items()))}): "
            f"the setting is rung {tuning.chosen_rung}'s best{fraction}, never tuned at the full budget")
