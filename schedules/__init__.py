"""LR schedules: pure functions of the optimizer step (schedules.functions), run by schedules.Scheduler.

The Scheduler multiplies each param group's own base LR, so groups keep their LR ratios, and its state is the
step (plus the one metric-driven schedule's, schedules.plateau), so resuming mid-schedule is exact.
"""

from __future__ import annotations

from schedules.functions import (
    Schedule,
    constant,
    cosine,
    cosine_warmup,
    exponential,
    inverse_sqrt,
    multistep,
    poly,
    sgdr,
    step,
    warmup_exp,
    warmup_linear,
    wsd,
)
from schedules.horizon import Horizon
from schedules.plateau import Plateau, plateau
from schedules.scheduler import Scheduler

__all__ = [
    "Horizon", "Plateau", "Schedule", "Scheduler", "constant", "cosine", "cosine_warmup", "exponential",
    "inverse_sqrt", "multistep", "plateau", "poly", "sgdr", "step", "warmup_exp", "warmup_linear", "wsd",
]
