"""AdamCPR: Adam with Constrained Parameter Regularization instead of weight decay (Franke et al.,
"Improving Deep Learning Optimization through Constrained Parameter Regularization", arXiv 2311.09058).

Each regularized tensor p gets an upper bound kappa on R(p) = ||p||^2 (sum of squares) and a Lagrange
multiplier lambda >= 0 (starts at 0). After the plain Adam step (no weight decay):

    lambda <- max(0, lambda + mu/numel(p) * (R(p) - kappa))      (mu the update rate, 1.0 in the paper)
    p      <- p - lambda * grad R(p) = p - 2*lambda*p

so a tensor is only pulled back while (and as much as) its norm exceeds its own bound, instead of all
tensors decaying at one rate. As in the authors' code, R and its gradient are taken after the Adam step.

kappa_init: 'inflection_point' (default, the paper's Kappa-IP: kappa = R(p) once its growth, sampled every
`reg_step` steps and smoothed by `reg_ema`, first slows down) or 'uniform' (`kappa` for every tensor from the first
step); the detection and the authors' code: DESIGN.md.

Groups that set weight_decay=0 (kiln's no_decay group: biases, norms, embeddings) or constrain=False stay
unconstrained (plain Adam), like the paper which regularizes the weight matrices. Everything stays on the
device: unset kappa is +inf, for which the lambda update yields exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from optim.core import (
    beta_pair,
    closure_loss,
    groups_with_grads,
    int_at_least,
    nonnegative,
    one_of,
    positive,
    unit_interval,
)

KAPPA_INITS = ("inflection_point", "uniform")


class CPR(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, kappa_init: str = "inflection_point", kappa: float = 1.0, mu: float = 1.0,
                 reg_step: int = 200, reg_ema: float = 0.0, constrain: bool = True) -> None:
        betas = tuple(float(b) for b in betas)
        nonnegative(lr=lr)
        beta_pair("betas", betas)
        nonnegative(eps=eps)
        one_of("kappa_init", kappa_init, KAPPA_INITS)
        positive(kappa=kappa, mu=mu)
        int_at_least("reg_step", reg_step, 1)
        unit_interval(reg_ema=reg_ema)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, kappa_init=kappa_init, kappa=kappa, mu=mu,
                                      reg_step=reg_step, reg_ema=reg_ema, constrain=constrain))

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            scalar = dict(dtype=p.dtype, device=p.device)
            state["lagmul"] = torch.zeros((), **scalar)
            unset = group["kappa_init"] == "inflection_point"
            state["kappa"] = torch.full((), math.inf if unset else group["kappa"], **scalar)
            if unset:
                for key in ("reg_ema", "prev_reg", "prev_rise"):
                    state[key] = torch.zeros((), **scalar)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = closure_loss(closure)
        for group, params in groups_with_grads(self):
            b1, b2 = group["betas"]
            grads = [p.grad for p in params]
            states = [self._init_state(p, group) for p in params]
            for s in states:
                s["step"] += 1
            steps = [s["step"] for s in states]

            # Adam, no weight decay.
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            torch._foreach_lerp_(m, grads, 1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, 1.0 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1.0 - b2**t) for t in steps])
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, m, denom, [-group["lr"] / (1.0 - b1**t) for t in steps])

            if not group["constrain"] or group.get("weight_decay") == 0:
                continue
            reg = torch._foreach_norm(params)
            torch._foreach_mul_(reg, reg)  # R = ||p||^2
            if group["kappa_init"] == "inflection_point":
                self._detect_inflection(group, states, reg)
            lagmuls = [s["lagmul"] for s in states]
            excess = torch._foreach_sub(reg, [s["kappa"] for s in states])
            torch._foreach_mul_(excess, [group["mu"] / p.numel() for p in params])
            torch._foreach_add_(lagmuls, excess)
            torch._foreach_clamp_min_(lagmuls, 0.0)
            shrink = torch._foreach_mul(lagmuls, -2.0)
            torch._foreach_add_(shrink, 1.0)
            torch._foreach_mul_(params, shrink)
        return loss

    @staticmethod
    def _detect_inflection(group: dict[str, Any], states: list[dict[str, Any]],
                           reg: list[torch.Tensor]) -> None:
        """Every reg_step steps: set each unset kappa to R where the sampled rise of R shrinks (on device)."""
        s0, beta = group["reg_step"], group["reg_ema"]
        for s, r in zip(states, reg):
            t = s["step"]
            if t % s0:
                continue
            s["reg_ema"].lerp_(r, 1.0 - beta)
            if t <= s0:
                continue
            smoothed = s["reg_ema"] / (1.0 - beta ** (t // s0))  # e_k
            rise = smoothed - s["prev_reg"]
            if t > 3 * s0:
                found = torch.isinf(s["kappa"]) & (rise < s["prev_rise"])
                s["kappa"].copy_(torch.where(found, r, s["kappa"]))
            s["prev_reg"].copy_(smoothed)
            if t > 2 * s0:
                s["prev_rise"].copy_(rise)
