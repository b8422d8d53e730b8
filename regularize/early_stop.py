"""Early stopping on an evaluation metric, keeping the best weights and restoring them at the end."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class EarlyStopping:
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` evaluations.

    mode: "min" (a loss) or "max" (an accuracy). With `restore_best`, the trainer loads the best weights
    back into the model when training ends, for whatever reason it ends.
    """

    # acts on evaluations (the config checker requires some): the first sets the best, then `patience` (>= 1) stop
    evaluations_to_act = staticmethod(lambda patience: max(patience, 1) + 1)

    def __init__(self, monitor: str, mode: str = "min", patience: int = 3, min_delta: float = 0.0,
                 restore_best: bool = True) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"early_stop.mode={mode!r}: must be one of min, max")
        if patience < 0:
            raise ValueError(f"early_stop.patience={patience}: must be an int >= 0")
        if not min_delta >= 0:
            raise ValueError(f"early_stop.min_delta={min_delta}: must be a number >= 0")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.restore_best = min_delta, restore_best
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step = -1
        self.bad_evals = 0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.reason = ""

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: dict[str, float], step: int, model: nn.Module) -> bool:
        """Record one evaluation; returns True when training should stop."""
        if self.monitor not in metrics:
            raise KeyError(f"early_stop.monitor={self.monitor!r} is not an eval metric; have {sorted(metrics)}")
        value = metrics[self.monitor]
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            if self.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.reason = (f"early stop at step {step}: {self.monitor} has not improved on {self.best:.6g} "
                           f"(step {self.best_step}) by more than {self.min_delta} for {self.bad_evals} evaluations")
            return True
        return False

    def restore(self, model: nn.Module) -> bool:
        if self.restore_best and self.best_weights is not None:
            model.load_state_dict(self.best_weights)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return copy.copy(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
