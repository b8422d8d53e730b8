"""Softplus Adam, "Sadam" (Tong, Liang & Bi, "Calibrating the Adaptive Learning Rate to Improve Convergence of
ADAM", arXiv 1908.00700), as the authors implement it (optimizer/Sadam.py in github.com/neilliang90/Sadam):

    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    u = sqrt(1-b2^t)/(1-b1^t) * m / softplus_beta(sqrt(v)),   softplus_beta(x) = log(1 + exp(beta*x))/beta
    p <- p - lr*wd*p - lr*u

The softplus replaces sqrt(v) + eps and takes the raw sqrt(v): the bias corrections stay in the step size, outside
the softplus, as in Adam's efficient form. Its floor log(2)/beta (the smallest denominator) therefore acts on the
uncorrected sqrt(v), which early in training is sqrt(1-b2^t) times smaller than sqrt(v_hat): with small
gradients the first steps are well below lr. (Softplus of the corrected sqrt(v_hat) makes the first steps 5x to
30x larger for |g| from 0.1 down to 1e-3, still ~1.2x at step 1000 for |g| = 0.01.) beta = 50 is the paper's
recommendation; as in torch's softplus, beta*x > threshold (20) takes the linear branch x.

torch has no foreach softplus: the denominator is one vectorised softplus per tensor (into a reused scratch tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from optim.adam_core import (
    AdamFamily,
    Batch,
    adam_defaults,
    adam_moments_,
    apply_update_,
    bias_corrections,
    elementwise,
)
from optim.core import require

softplus = torch._C._nn.softplus  # softplus(x, beta, threshold, out=...): torch.nn.functional's, with an out= form


class AdamSoftplus(AdamFamily):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 weight_decay: float = 0.0, softplus_beta: float = 50.0, threshold: float = 20.0,
                 cautious: bool = False, cautious_wd: bool = False) -> None:
        defaults = adam_defaults(lr, betas, None, weight_decay, cautious, cautious_wd, softplus_beta=softplus_beta,
                                 threshold=threshold)
        require(softplus_beta > 0.0, "softplus_beta", softplus_beta)
        require(threshold > 0.0, "threshold", threshold)
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], piece: Batch) -> None:
        b1, b2 = group["betas"]
        m, v = adam_moments_(piece, group["betas"])
        den = elementwise(torch.sqrt, piece.scratch(0), v)
        den = elementwise(softplus, piece.scratch(0), den, group["softplus_beta"], group["threshold"])
        # u = m/den with den = softplus(sqrt(v)) * (1-b1^t)/sqrt(1-b2^t): the step size folded into the divisor
        torch._foreach_mul_(den, [bc1 / bc2**0.5 for bc1, bc2 in zip(bias_corrections(b1, piece.steps),
                                                                      bias_corrections(b2, piece.steps))])
        apply_update_(piece.params, m, piece.grads, group["lr"], group["weight_decay"], group["cautious"],
                      group["cautious_wd"], piece.scratch(1), denominators=den)
