"""LAMB, layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep Learning", arXiv 1904.00962).

Per tensor (layer) p, with the bias-corrected Adam direction (so early steps are not too large):

    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    r = m_hat/(sqrt(v_hat) + eps) + wd*p
    p <- p - lr * (||p|| / ||r||) * r        where weight decay applies (wd != 0), or always_adapt
    p <- p - lr * r                          elsewhere (wd = 0: kiln's no_decay group of biases, norms, embeddings)

The trust ratio (1 where either norm is zero) applies by default only to tensors with weight decay, as timm and
apex do; always_adapt=True applies it to every tensor (why: DESIGN.md).

Options: `cautious` masks the Adam direction before the decay term is added (arXiv 2411.16085); `cautious_wd`
keeps wd*p only where p and the Adam direction agree in sign (arXiv 2510.12402). The trust ratio is computed on
the resulting r.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from optim.adam_core import AdamFamily, Batch, adam_defaults, adam_direction, adam_moments_
from optim.cautious import cautious_mask_, decay_mask


def trust_ratios(params: list[Tensor], updates: list[Tensor]) -> list[Tensor]:
    """||p||/||r|| per tensor as 0-dim device tensors; 1 where either norm is zero (the division's inf/nan there
    is discarded by the where)."""
    p_norms, r_norms = torch._foreach_norm(params), torch._foreach_norm(updates)
    return [torch.where(torch.minimum(pn, rn) > 0, pn / rn, 1.0) for pn, rn in zip(p_norms, r_norms)]


class Lamb(AdamFamily):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 1e-2, always_adapt: bool = False,
                 cautious: bool = False, cautious_wd: bool = False) -> None:
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay, cautious, cautious_wd,
                                               always_adapt=always_adapt))

    def _update(self, group: dict[str, Any], piece: Batch) -> None:
        m, v = adam_moments_(piece, group["betas"])
        r = adam_direction(m, v, group["betas"], group["eps"], piece.steps, piece.scratch(0))
        if group["cautious"]:
            cautious_mask_(r, piece.grads, piece.scratch(1))
        wd = group["weight_decay"]
        if wd != 0.0 and group["cautious_wd"]:
            masks = decay_mask(piece.params, r, piece.scratch(1))
            torch._foreach_mul_(masks, piece.params)
            torch._foreach_add_(r, masks, alpha=wd)
        elif wd != 0.0:
            torch._foreach_add_(r, piece.params, alpha=wd)
        if wd != 0.0 or group["always_adapt"]:
            torch._foreach_addcmul_(piece.params, r, trust_ratios(piece.params, r), value=-group["lr"])
        else:
            torch._foreach_add_(piece.params, r, alpha=-group["lr"])
