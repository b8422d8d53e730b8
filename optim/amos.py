"""Amos (Tian & Parikh, "Amos: An Adam-style Optimizer with Adaptive Weight Decay towards Model-Oriented
Scale", arXiv 2210.11693), following the authors' reference (jestimator/amos.py).

Each tensor has a target scale eta (the "model-oriented scale": the expected size of its entries) and a
reduced second moment v (one value per output unit of a >=2-D weight, reduced over the other axes; a single
value for vectors and scalars), plus a scalar-per-unit decay state b (starts at 0). With xi = lr (the
global learning rate, ~1/sqrt(number of batches) in the paper) and t the step:

    g2    = mean of g^2 over the reduced axes
    v    <- beta*v + (1-beta)*g2;                   r = (1 - beta^t) / max(v, eps)      (1/v_hat)
    gamma = xi^2 * r * g2 / sqrt(1 + zeta*sqrt(xi)*b)                  (adaptive weight-decay rate)
    u     = (-xi*eta*sqrt(r)*g - gamma/2 * p) / (1 + zeta*sqrt(xi*eta)*b)
    b    <- b + gamma*(1 + b)                                           (drives the learning-rate decay)
    m    <- mom*m + (1-mom)*u  and u = m            (optional momentum, EMA of the updates; off when 0)
    p    <- p + u

eta per tensor: the group's `eta` when set, else eta_scale/sqrt(fan_in) for >=2-D weights (fan_in =
numel/shape[0], the input size of a Linear/Conv weight), eta_norm for the scales of normalisation layers (role
"norm", optim/param_groups.py) and eta_vector for other vectors and scalars. The authors' examples
(jestimator/models/{bert,bert_rpe,rope}/modeling.py get_eta_fn) give layer-norm scales eta 1.0 and biases 0.5,
and the README's MNIST CNN biases 0.5: the defaults eta_norm=1.0, eta_vector=0.5. Amos decays
every tensor towards its own scale by itself: it has no weight_decay parameter (the `weight_decay` key of a
param group is ignored).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from optim.core import closure_loss, groups_with_grads, nonnegative, positive, unit_interval
from optim.param_groups import param_role


def default_eta(p: torch.Tensor, eta_scale: float, eta_vector: float, eta_norm: float = 1.0) -> float:
    """The expected entry size of p: eta_scale/sqrt(fan_in) for weights, eta_norm for the scales of
    normalisation layers, eta_vector for other vectors/scalars."""
    if p.ndim >= 2:
        return eta_scale / math.sqrt(p.numel() // p.shape[0])
    return eta_norm if param_role(p) == "norm" else eta_vector


def reduced_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of v and b: one value per output unit (axis 0) of a >=2-D tensor, else a single value."""
    return (p.shape[0],) + (1,) * (p.ndim - 1) if p.ndim >= 2 else ()


class Amos(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-2, beta: float = 0.999, zeta: float = 0.25,
                 momentum: float = 0.0, eps: float = 2.0**-125, eta_scale: float = 1.0,
                 eta_vector: float = 0.5, eta_norm: float = 1.0) -> None:
        nonnegative(lr=lr)
        unit_interval(beta=beta)
        nonnegative(zeta=zeta)
        unit_interval(momentum=momentum)
        positive(eps=eps, eta_scale=eta_scale, eta_vector=eta_vector, eta_norm=eta_norm)
        super().__init__(params, dict(lr=lr, beta=beta, zeta=zeta, momentum=momentum, eps=eps,
                                      eta_scale=eta_scale, eta_vector=eta_vector, eta_norm=eta_norm))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = closure_loss(closure)
        for group, params in groups_with_grads(self):
            xi, beta, zeta, mom = group["lr"], group["beta"], group["zeta"], group["momentum"]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, s in zip(params, states):
                if not s:
                    s["step"] = 0
                    s["v"] = torch.zeros(reduced_shape(p), dtype=p.dtype, device=p.device)
                    s["b"] = torch.zeros(reduced_shape(p), dtype=p.dtype, device=p.device)
                if mom > 0 and "momentum" not in s:
                    s["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["step"] += 1
            eta = group.get("eta")  # a per-group override, e.g. {"params": ..., "eta": 1.0}
            etas = [eta if eta is not None else default_eta(p, group["eta_scale"], group["eta_vector"],
                                                            group.get("eta_norm", 1.0))  # older checkpoints
                    for p in params]
            vs, bs = [s["v"] for s in states], [s["b"] for s in states]
            # Reduced second moment (per tensor: the reduced axes depend on its shape).
            g2 = [(g * g).mean(dim=tuple(range(1, g.ndim)), keepdim=True) if g.ndim >= 2 else (g * g).mean()
                  for g in grads]
            torch._foreach_lerp_(vs, g2, 1.0 - beta)
            r = torch._foreach_clamp_min(vs, group["eps"])
            torch._foreach_reciprocal_(r)
            torch._foreach_mul_(r, [1.0 - beta ** s["step"] for s in states])
            # gamma = xi^2 * r * g2 / sqrt(1 + zeta*sqrt(xi)*b)
            gamma = torch._foreach_mul(bs, zeta * math.sqrt(xi))
            torch._foreach_add_(gamma, 1.0)
            torch._foreach_rsqrt_(gamma)
            torch._foreach_mul_(gamma, r)
            torch._foreach_mul_(gamma, g2)
            torch._foreach_mul_(gamma, xi * xi)
            # d = 1 / (1 + zeta*sqrt(xi*eta)*b)
            d = torch._foreach_mul(bs, [zeta * math.sqrt(xi * eta) for eta in etas])
            torch._foreach_add_(d, 1.0)
            torch._foreach_reciprocal_(d)
            # u = coef_g*g + coef_p*p, coef_g = -xi*eta*sqrt(r)*d and coef_p = -gamma*d/2 (reduced shapes)
            coef_g = torch._foreach_sqrt(r)
            torch._foreach_mul_(coef_g, d)
            torch._foreach_mul_(coef_g, [-xi * eta for eta in etas])
            coef_p = torch._foreach_mul(gamma, d)
            torch._foreach_mul_(coef_p, -0.5)
            # b <- b + gamma*(1 + b)
            grow = torch._foreach_add(bs, 1.0)
            torch._foreach_mul_(grow, gamma)
            torch._foreach_add_(bs, grow)
            update = torch._foreach_mul(grads, coef_g)
            torch._foreach_addcmul_(update, params, coef_p)
            if mom > 0:
                ms = [s["momentum"] for s in states]
                torch._foreach_lerp_(ms, update, 1.0 - mom)
                update = ms
            torch._foreach_add_(params, update)
        return loss
