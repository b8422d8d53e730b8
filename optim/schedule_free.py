"""Schedule-free optimizers (Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682): what the trainer must
do for an optimizer that trains at one point and is evaluated at another.

The optimizers are the authors' package `schedulefree` (conf/optimizer/sf_*.yaml name its classes). They keep two
sequences: the parameters hold y (where gradients are taken) in train mode and x (the average, what to evaluate and
save) in eval mode; `optimizer.train()` / `optimizer.eval()` move them between the two in place (a lerp with z). Any
optimizer with such methods is switched (`has_modes`: a capability, not a name).

`Modes` switches lazily: to x before anything looks at the weights (evaluation, pictures, early stopping's
snapshot, a checkpoint, the end), back to y only before the next training step. The way back is not the package's
lerp alone: x -> y by lerp is not exact in floating point, so an evaluation would nudge the training trajectory, and a
checkpoint written at any step (a signal's) would resume on a y the uninterrupted run never had. So the switch to x
keeps a copy of the model's state at y (parameters and buffers: BatchNorm's running statistics), the way back restores
it exactly, and a checkpoint holds it (`state_dict`) beside x: evaluating never changes training, and a resume from
any checkpoint is bit for bit the uninterrupted run. The cost is one copy of the model while x is in place, and in
each checkpoint. A switch to x also recomputes the BatchNorm statistics for x (the authors' README, "Caveats"): the
running statistics were gathered at y.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def has_modes(optimizer: Any) -> bool:
    """Whether `optimizer` (or its class) keeps separate training and evaluation weights: train() and eval()."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


class Modes:
    """Keeps the model at y while training and at x otherwise (see the module docstring). For an optimizer without
    modes every method does nothing. `refresh` runs after every switch to x (BatchNorm statistics)."""

    def __init__(self, optimizer: Any, model: nn.Module, refresh: Callable[[], None] = lambda: None) -> None:
        self.optimizer = optimizer if has_modes(optimizer) else None
        self.model, self.refresh = model, refresh
        self.evaluating = True  # the package's optimizers start in eval mode, and a checkpoint holds them in it
        self.training: dict[str, torch.Tensor] | None = None  # the model's state at y while x is in place

    def train(self) -> None:
        """Before a training step: the model back to y, exactly (a bool check when it is there already)."""
        if self.optimizer is not None and self.evaluating:
            self.optimizer.train()
            if self.training is not None:
                self.model.load_state_dict(self.training)
                self.training = None
            self.evaluating = False

    def eval(self) -> None:
        """Before the weights are evaluated, saved or kept: y kept aside, the model to x, BatchNorm statistics for x."""
        if self.optimizer is not None and not self.evaluating:
            self.training = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.optimizer.eval()
            self.evaluating = True
            self.refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"training": self.training}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's y (None from a checkpoint without one: the way back is then the package's lerp)."""
        self.training = (state or {}).get("training") if self.optimizer is not None else None
        self.evaluating = True
