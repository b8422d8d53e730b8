"""Reduce on plateau: the one schedule driven by evaluation metrics instead of the step alone.

A Plateau is a small callable object: `observe(metrics)` after every evaluation (schedules.Scheduler.observe),
`__call__(step)` for the multiplier, and `state_dict()` / `load_state_dict()` for the best value, counters and
multiplier, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import math

from schedules.functions import Duration, check_range, linear_warmup, warmup_steps
from schedules.horizon import Horizon

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")
STATE = ("multiplier", "best", "bad_evals", "cooldown_left", "evaluations")


class Plateau:
    """Multiply the LR by `factor` when `monitor` has not improved for more than `patience` evaluations.

    Rule (torch.optim.lr_scheduler.ReduceLROnPlateau, per evaluation instead of per epoch): a value improves
    when it beats the best so far by more than threshold*|best| (threshold_mode rel) or threshold (abs):
    lower in mode min, higher in mode max. Each evaluation without improvement adds one bad evaluation; when
    there are more than `patience` of them, multiplier <- max(multiplier*factor, min_multiplier), and the
    next `cooldown` evaluations are ignored (no bad evaluations counted). __call__(t) = (t+1)/W * multiplier
    during the shared linear warmup, multiplier after.
    """

    def __init__(self, monitor: str = "test_loss", mode: str = "min", factor: float = 0.5, patience: int = 2,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_multiplier: float = 0.0, warmup_steps: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"schedule.mode={mode!r}: use one of {list(MODES)}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"schedule.threshold_mode={threshold_mode!r}: "
                             f"use one of {list(THRESHOLD_MODES)}")
        check_range("factor", factor, 0.0, 1.0, low_open=True, high_open=True,
                    what="the LR is multiplied by it")
        check_range("threshold", threshold, 0.0, math.inf, high_open=True)
        check_range("min_multiplier", min_multiplier, 0.0, 1.0,
                    what="the lowest LR as a fraction of the base LR")
        for key, value in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"schedule.{key}={value!r} must be a whole number of evaluations >= 0")
        self.monitor, self.mode, self.factor, self.patience = monitor, mode, float(factor), patience
        self.threshold, self.threshold_mode, self.cooldown = float(threshold), threshold_mode, cooldown
        self.min_multiplier, self.warmup_steps = float(min_multiplier), int(warmup_steps)
        # The state (what a resume restores).
        self.multiplier = 1.0
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_evals = 0
        self.cooldown_left = 0
        self.evaluations = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return linear_warmup(step, self.warmup_steps) * self.multiplier
        return self.multiplier

    def state_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in STATE}

    def load_state_dict(self, state: dict[str, float]) -> None:
        for k in STATE:
            setattr(self, k, state[k])

    def improved(self, value: float) -> bool:
        if self.threshold_mode == "rel":
            margin = abs(self.best) * self.threshold if math.isfinite(self.best) else 0.0
        else:
            margin = self.threshold
        return value < self.best - margin if self.mode == "min" else value > self.best + margin

    def observe(self, metrics: dict[str, float]) -> None:
        """Record one evaluation's metrics (keys as task.evaluate() returns them; 'eval/<key>' works too)."""
        key = self.monitor
        if key not in metrics and key.startswith("eval/") and key[5:] in metrics:
            key = key[5:]
        if key not in metrics:
            raise KeyError(f"schedule.monitor={self.monitor!r} is not an eval metric; have {sorted(metrics)}")
        value = float(metrics[key])
        self.evaluations += 1
        if self.improved(value):
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_evals = 0
        if self.bad_evals > self.patience:
            self.multiplier = max(self.multiplier * self.factor, self.min_multiplier)
            self.cooldown_left, self.bad_evals = self.cooldown, 0


def plateau(horizon: Horizon, monitor: str = "test_loss", mode: str = "min", factor: float = 0.5,
            patience: int = 2, threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
            min_multiplier: float = 0.0, warmup: Duration = 0) -> Plateau:
    """Reduce on plateau (see Plateau), with the shared linear warmup `warmup` (steps, "2ep" or a fraction).

    Not a pure function of the step: the multiplier falls by `factor` after more than `patience` evaluations
    without improvement of `monitor`. (torch ReduceLROnPlateau; Keras ReduceLROnPlateau.)
    """
    return Plateau(monitor, mode, factor, patience, threshold, threshold_mode, cooldown, min_multiplier,
                   warmup_steps(horizon, warmup))


# acts on evaluations (the config checker requires some): the best, then more than `patience` lower the LR
plateau.evaluations_to_act = lambda patience: patience + 2
