"""kiln's LR scheduler: each param group's lr is its own base lr times schedule(step), for the step it is given.

The loop passes the step (and a metric-driven schedule its evaluation metrics) explicitly, so nothing counts
calls, groups keep their LR ratios, and the state a resume needs is the step plus the schedule's own.
"""

from __future__ import annotations

from typing import Any

import torch

from schedules.functions import Schedule
from schedules.plateau import Plateau


class Scheduler:
    def __init__(self, schedule: Schedule, optimizer: torch.optim.Optimizer) -> None:
        self.schedule, self.optimizer = schedule, optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step(0)

    def lr_at(self, step: int) -> list[float]:
        multiplier = self.schedule(step)
        return [base * multiplier for base in self.base_lrs]

    def step(self, step: int) -> None:
        """Set every group's lr for update `step` (0-based: the number of updates made before it)."""
        self.last_step = step
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(step), strict=True):
            group["lr"] = lr

    @property
    def monitors(self) -> list[Plateau]:
        """The metric-driven schedules (what the run watches for them)."""
        return [self.schedule] if isinstance(self.schedule, Plateau) else []

    def observe(self, metrics: dict[str, float]) -> None:
        """An evaluation's metrics; a changed multiplier applies from the very next update."""
        for schedule in self.monitors:
            schedule.observe(metrics)
            self.step(self.last_step)

    def rebase(self, base_lrs: list[float]) -> None:
        """New base LRs (a resume with a changed config), effective at once."""
        self.base_lrs = list(base_lrs)
        self.step(self.last_step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.last_step, "schedule": [s.state_dict() for s in self.monitors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for schedule, saved in zip(self.monitors, state["schedule"], strict=True):
            schedule.load_state_dict(saved)
        self.step(state["step"])
