"""Weight decay, coupled or decoupled (Loshchilov & Hutter 1711.05101).

decoupled: the optimizer applies it (AdamW: p -= lr*wd*p, outside the adaptive step).
coupled:   L2 regularisation, (wd/2)*||p||^2 added to the loss. Its gradient is wd*p, so instead of growing the
           autograd graph the first link of the trainer's gradient-transform chain adds wd*p to the gradients of
           the decayed parameters (after unscaling, before clipping): exactly the gradient of the penalised loss.
           The optimizer's own weight_decay is then set to 0, so nothing is decayed twice.

Coupled mode needs an optimizer with a weight_decay hyperparameter: optimizers that regularize by a rule of
their own (CPR's norm constraint, Amos's adaptive decay) have none to move into the loss, and zeroing their
groups' weight_decay switched CPR off (it reads weight_decay=0 as "unregularized group"). With such an optimizer
and regularize.weight_decay > 0, coupled mode is a config error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optim.transforms import GradientTransform

MODES = ("decoupled", "coupled")


class CoupledWeightDecay(GradientTransform):
    """g += wd * p for the parameters of the optimizer's decayed groups (those with weight_decay > 0)."""

    loss_term = True

    def __init__(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        self.weight_decay = weight_decay
        self.params: list[torch.nn.Parameter] = []
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0.0) > 0:
                self.params += group["params"]
            group["weight_decay"] = 0.0

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        with torch.no_grad():
            pairs = [(p.grad, p) for p in self.params if p.grad is not None]
            if pairs:
                grads, params = zip(*pairs)
                torch._foreach_add_(list(grads), list(params), alpha=self.weight_decay)


def coupled_weight_decay(optimizer: torch.optim.Optimizer, mode: str, weight_decay: float
                         ) -> CoupledWeightDecay | None:
    """The coupled-L2 transform for `mode`, or None when the optimizer handles weight decay itself (or there is none).
    ValueError naming the keys when `mode` is unknown, or coupled with an optimizer that has no weight decay."""
    if mode not in MODES:
        raise ValueError(f"regularize.weight_decay_mode={mode!r}: use one of {', '.join(MODES)}")
    if mode != "coupled" or weight_decay <= 0:
        return None
    if "weight_decay" not in optimizer.defaults:
        name = type(optimizer).__name__
        raise ValueError(
            f"regularize.weight_decay_mode=coupled with regularize.weight_decay={weight_decay}: {name} has no "
            f"weight decay to move into the loss (it regularizes by its own rule); use "
            f"regularize.weight_decay_mode=decoupled (regularize.weight_decay does not apply to {name}) or "
            "regularize.weight_decay=0, or an optimizer with weight decay for L2 in the loss")
    return CoupledWeightDecay(optimizer, weight_decay)


def l2_penalty(params: Sequence[torch.nn.Parameter], weight_decay: float) -> torch.Tensor:
    """(wd/2) * sum ||p||^2: the term coupled mode adds to the loss (for logging and tests)."""
    return 0.5 * weight_decay * sum((p.float() ** 2).sum() for p in params)
