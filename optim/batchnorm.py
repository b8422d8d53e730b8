"""BatchNorm running statistics recomputed for weights other than the ones they were gathered at (a schedule-free
optimizer's x, optim/schedule_free.py; a weight average, optim/averaging.py).

The rule is torch.optim.swa_utils.update_bn's: reset the running statistics, set momentum to None (a cumulative
average, so every batch counts equally and nothing of the old statistics remains), forward the batches in train mode
without gradients, restore momentum. Written out because update_bn calls `model(input)` on a loader's batches, and a
kiln task's forward is `task.loss(model, batch)`: the caller passes `forward`. Under DDP each rank forwards its own
shard; `all_mean` (the trainer's) then averages the statistics so every rank evaluates the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any],
                        all_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Running mean and variance of every BatchNorm layer of `model` as the equal average over `batches` (each passed
    to `forward`) at the current weights. Returns the number of batches used; with none, nothing changes."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    old = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in layers]
    training = model.training
    model.train()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    count = 0
    for batch in batches:
        forward(batch)
        count += 1
    for m, (momentum, state) in zip(layers, old, strict=True):
        m.momentum = momentum
        if count == 0:
            m.load_state_dict(state)
        elif all_mean is not None:
            m.running_mean.copy_(all_mean(m.running_mean))
            m.running_var.copy_(all_mean(m.running_var))
    model.train(training)
    return count
