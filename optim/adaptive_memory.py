"""Adaptive memory momentum for SGD and AdamW (Topollai & Choromanska, "Adaptive Memory Momentum via a Model-Based
Framework for Deep Learning Optimization", arXiv 2510.04988, AISTATS 2026).

The momentum coefficient beta_t is not a constant but the solution of a proximal step on a two-plane model of the
objective: one plane from the current gradient g_t, one from the accumulated memory (the momentum direction d_t),

    f_t(x) = max{ f(x_t) + <g_t, x - x_t>,  f_hat_t + <d_t, x - x_t> }
    x_{t+1} = argmin_x f_t(x) + 1/(2 eta) ||x - x_t||_P^2 + lambda/(2 eta) ||P(x - x_t) + eta d_t||^2

(P = I for SGD, Adam's preconditioner for AdamW; the lambda term keeps the step near the pure-memory step). Its dual
is one scalar: the weight beta_t of the memory plane, and the step becomes the paper's momentum update

    d_{t+1} = (I + lambda P)^{-1} [ (1 - beta_t) g_t + (lambda P + beta_t I) d_t ],   x_{t+1} = x_t - eta P^{-1} d_{t+1}

(for SGD: d_{t+1} = (beta_t + lambda)/(1 + lambda) d_t + (1 - beta_t)/(1 + lambda) g_t), with, writing
M = P^{-1}(I + lambda P)^{-1} (diagonal) and e = d_t - g_t,

    beta_t = clip( [ (f_hat_t - f(x_t))/eta_t - <e, M (g_t + lambda P d_t)> ] / <e, M e>,  0, beta_max )

and beta_t = 0 where e = 0. The plane gap is estimated to first order from the last step,
f_hat_t - f(x_t) ~ f(x_{t-1}) - f(x_t) ~ <g_t, x_{t-1} - x_t> = eta_{t-1} <g_t, P^{-1} d_t + wd x_t> (x_{t-1} and
P_{t-1} taken as x_t and P_t, so nothing more is stored; wd: AdamW's decoupled decay, 0 for SGD). For SGD this is

    beta_t = clip( [ (1 + lambda) r <g, d> - <e, g + lambda d> ] / ||e||^2, 0, beta_max ),   r = eta_{t-1}/eta_t.

`AMSGD` (EMA-form momentum, L2 as torch.optim.SGD) and `AMAdamW` (Adam's preconditioner, decoupled decay);
one beta_t per tensor, on the device (sources and details: DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from optim.adam_core import Workspace
from optim.core import beta_pair, closure_loss, groups_with_grads, nonnegative, require


def dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all elements, a 0-dim tensor."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def memory_weight(numerator: Tensor, denominator: Tensor, beta_max: float) -> Tensor:
    """clip(numerator/denominator, 0, beta_max), and 0 where the denominator is 0 (d = g: either plane)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, torch.clamp(numerator / safe, 0.0, beta_max), torch.zeros_like(numerator))


def step_ratio(group: dict[str, Any], state: dict[str, Any]) -> float:
    """eta_{t-1}/eta_t (0 at lr = 0, where the update is void anyway)."""
    return state["prev_lr"] / group["lr"] if group["lr"] > 0 else 0.0


def check_common(lr: float, beta_max: float, lam: float, weight_decay: float) -> None:
    nonnegative(lr=lr, lam=lam, weight_decay=weight_decay)
    require(0.0 <= beta_max < 1.0, "beta_max", beta_max, "want 0 <= beta_max < 1")


class AMSGD(torch.optim.Optimizer):
    """SGD with adaptive memory momentum (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.01, beta_max: float = 0.9, lam: float = 0.1,
                 weight_decay: float = 0.0) -> None:
        check_common(lr, beta_max, lam, weight_decay)
        super().__init__(params, dict(lr=lr, beta_max=beta_max, lam=lam, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        for group, params in groups_with_grads(self):
            lr, lam, wd = group["lr"], group["lam"], group["weight_decay"]
            for p in params:
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if not state:  # d_0 = g_0
                    state["direction"] = g.clone(memory_format=torch.preserve_format)
                else:
                    d = state["direction"]
                    # with e = d - g: <e, g> = <d, g> - ||g||^2, <e, d> = ||d||^2 - <d, g>, ||e||^2 from the same
                    # three dots (no e tensor; where d ~ g the cancellation only blurs a beta that no longer matters)
                    dg, gg, dd = dot(d, g), dot(g, g), dot(d, d)
                    numerator = (1 + lam) * step_ratio(group, state) * dg - (dg - gg) - lam * (dd - dg)
                    beta = memory_weight(numerator, dd - 2 * dg + gg, group["beta_max"])
                    d.mul_((beta + lam) / (1 + lam)).addcmul_(g, (1 - beta) / (1 + lam))
                    state["beta"] = beta
                state["prev_lr"] = lr
                p.add_(state["direction"], alpha=-lr)
        return loss


class AMAdamW(torch.optim.Optimizer):
    """AdamW with adaptive memory momentum: betas = (beta_max, beta2) (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, lam: float = 0.1) -> None:
        betas = tuple(float(b) for b in betas)
        beta_pair("betas", betas)
        nonnegative(eps=eps)
        check_common(lr, betas[0], lam, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lam=lam))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        for group, params in groups_with_grads(self):
            lr, lam, wd, eps = group["lr"], group["lam"], group["weight_decay"], group["eps"]
            beta_max, beta2 = group["betas"]
            workspace = Workspace(max(p.numel() for p in params))  # scratch reused across the group's tensors
            for p in params:
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["beta_prod"] = torch.ones((), dtype=p.dtype, device=p.device)
                state["step"] += 1
                t, d, v = state["step"], state["direction"], state["exp_avg_sq"]
                precond, damped, scratch = (workspace.view(i, p) for i in range(3))
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # P_t = (1 - beta_max prod_{i<t} beta_i)(sqrt(v_hat) + eps);  damped = I + lambda P
                torch.div(v, 1 - beta2**t, out=precond).sqrt_().add_(eps).mul_(1 - beta_max * state["beta_prod"])
                torch.mul(precond, lam, out=damped).add_(1.0)
                if t == 1:
                    beta = torch.full((), beta_max, dtype=p.dtype, device=p.device)
                else:
                    gap = step_ratio(group, state) * (dot(g, torch.div(d, precond, out=scratch)) + wd * dot(g, p))
                    e = torch.sub(d, g, out=scratch)
                    e_metric = torch.div(e, precond).div_(damped)  # M e, M = P^-1 (I + lambda P)^-1
                    denominator = dot(e_metric, e)
                    # <M e, g + lambda P d> = <M e, g> + lambda <e/(I + lambda P), d>
                    numerator = gap - dot(e_metric, g) - lam * dot(e_metric.mul_(precond), d)
                    beta = memory_weight(numerator, denominator, beta_max)
                # d <- ((1 - beta) g + (lambda P + beta) d) / (I + lambda P)
                d.mul_(torch.mul(precond, lam, out=scratch).add_(beta)).addcmul_(g, 1 - beta).div_(damped)
                state["beta_prod"].mul_(beta)
                state["beta"] = beta
                state["prev_lr"] = lr
                p.mul_(1 - lr * wd).addcdiv_(d, precond, value=-lr)
        return loss
