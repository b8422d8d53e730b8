"""Cautious masking of an update (arXiv 2411.16085) and cautious weight decay (arXiv 2510.12402).

Cautious optimizers (Liang et al., "Cautious Optimizers: Improving Training with One Line of Code"): with the update
u that is subtracted (p -= lr*u) and the current gradient g, keep only the coordinates where u agrees with g and
rescale per tensor so the update keeps its size:

    phi = 1[u*g > 0];  u <- u * phi / max(mean(phi), 1e-3)

(the mean is over the tensor's elements; 1e-3 is the floor of the authors' and timm's implementation, so a tensor
whose mask is all zero gets a zero update instead of a division by zero).

Cautious weight decay (Chen et al., "Cautious Weight Decay"): apply decoupled decay only on coordinates where the
parameter and the update agree in sign, i.e. where decay and update push the same way:

    p <- p - lr*(u + wd * 1[u*p >= 0] * p)

Both work on lists of tensors, writing their masks into scratch tensors when given; no value is read on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK_MEAN_FLOOR = 1e-3


def _products(a: list[Tensor], b: list[Tensor], out: list[Tensor] | None) -> list[Tensor]:
    """a*b per tensor, into `out` (scratch views) when given."""
    if out is None:
        return list(torch._foreach_mul(a, b))
    for x, y, o in zip(a, b, out):
        torch.mul(x, y, out=o)
    return out


def cautious_mask_(updates: list[Tensor], grads: list[Tensor], out: list[Tensor] | None = None) -> None:
    """u <- u * 1[u*g > 0] / max(mean(1[u*g > 0]), 1e-3), per tensor, in place. `out`: scratch for the masks."""
    masks = _products(updates, grads, out)
    for mask in masks:
        mask.gt_(0.0)  # 1 where u*g > 0, else 0 (in the update's dtype)
    kept = [mask.mean() for mask in masks]  # a count over numel: exact, whatever the summation order
    torch._foreach_clamp_min_(kept, MASK_MEAN_FLOOR)
    torch._foreach_div_(masks, kept)
    torch._foreach_mul_(updates, masks)


def decay_mask(params: list[Tensor], updates: list[Tensor], out: list[Tensor] | None = None) -> list[Tensor]:
    """1[u*p >= 0] per element, as tensors of the parameters' dtype (in `out`, scratch views, when given)."""
    masks = _products(updates, params, out)
    for mask in masks:
        mask.ge_(0.0)
    return masks
