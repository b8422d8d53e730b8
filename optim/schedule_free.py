"""Schedule-free optimizers (Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682): what the trainer must
do for an optimizer that trains at one point and is evaluated at another.

The optimizers are the authors' package `schedulefree` (conf/optimizer/sf_*.yaml name its classes). They keep two
sequences: the parameters hold y (where gradients are taken) in train mode and x (the average, what to evaluate and
save) in eval mode; `optimizer.train()` / `optimizer.eval()` move them between the two in place (a lerp with z). Any
optimizer with such methods is switched (`has_modes`: a capability, not a name).

`Modes` switches lazily: to x before anything looks at the weights (evaluation, pictures, early stopping's
snapshot, a checkpoint, the end), back to y only before the next training step. So a checkpoint always holds x with
the optimizer in eval mode, and the uninterrupted run and a run resumed from that checkpoint both go x -> y with the
same lerp: the continuation is bit for bit the same. Switching back and forth is not exact in floating point, which
is why the round trip must happen on both paths alike. A switch to x also recomputes the BatchNorm statistics for x
(the authors' README, "Caveats"): the running statistics were gathered at y.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Param-group entries the package's optimizers update as they run (step count, the average's weight sum, the largest
# lr so far, the mode): state, not hyperparameters, so a resume that changes hyperparameters must keep them.
RUNNING_KEYS = frozenset({"k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"})


def has_modes(optimizer: Any) -> bool:
    """Whether `optimizer` (or its class) keeps separate training and evaluation weights: train() and eval()."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def running_keys(optimizer: Any) -> frozenset[str]:
    """The param-group entries of `optimizer` that a resume must not overwrite with the new config's."""
    return RUNNING_KEYS if has_modes(optimizer) else frozenset()


class Modes:
    """Keeps the parameters at y while training and at x otherwise (see the module docstring). For an optimizer
    without modes both methods do nothing. `refresh` runs after every switch to x (BatchNorm statistics)."""

    def __init__(self, optimizer: Any, refresh: Callable[[], None] = lambda: None) -> None:
        self.optimizer = optimizer if has_modes(optimizer) else None
        self.refresh = refresh
        self.evaluating = True  # the package's optimizers start in eval mode, and a checkpoint holds them in it

    def train(self) -> None:
        """Before a training step: the parameters to y (a bool check when they are there already)."""
        if self.optimizer is not None and self.evaluating:
            self.optimizer.train()
            self.evaluating = False

    def eval(self) -> None:
        """Before the weights are evaluated, saved or kept: the parameters to x, BatchNorm statistics for x."""
        if self.optimizer is not None and not self.evaluating:
            self.optimizer.eval()
            self.evaluating = True
            self.refresh()
