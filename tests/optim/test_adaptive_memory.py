"""Adaptive memory momentum (optim/adaptive_memory.py): AM-SGD and AM-AdamW against the two-plane model's formulas
written out with host floats, a step worked by hand, convergence, and state_dict lock-step."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from optim.adaptive_memory import AMSGD, AMAdamW
from tests.conftest import compose_cfg
from tests.optim.harness import (
    F64,
    MATRIX,
    MATRIX_GRADS,
    VECTOR,
    VECTOR_GRADS,
    assert_converges,
    assert_state_dict_lockstep,
    check_against,
    quadratic,
    rosenbrock,
    trajectory,
)

GRADS = [MATRIX_GRADS[t % 3] * (1 + 0.3 * t) for t in range(5)]
VGRADS = [VECTOR_GRADS[t % 3] * (1 - 0.1 * t) for t in range(5)]


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def clip_beta(numerator: float, denominator: float, beta_max: float) -> float:
    return 0.0 if denominator == 0 else min(max(numerator / denominator, 0.0), beta_max)


def ref_amsgd(p, grads, lrs, beta_max=0.9, lam=0.1, wd=0.0):
    """beta_t = clip([(1+lam) r <g,d> - <d-g, g + lam d>]/||d-g||^2, 0, beta_max), r = eta_{t-1}/eta_t;
    d <- ((beta+lam) d + (1-beta) g)/(1+lam); d_0 = g_0; x <- x - eta d; g includes wd*x."""
    out, d, betas = [], None, []
    for t, (g, lr) in enumerate(zip(grads, lrs)):
        g = g + wd * p
        if d is None:
            d = g.clone()
        else:
            e = d - g
            r = lrs[t - 1] / lr
            beta = clip_beta((1 + lam) * r * inner(g, d) - inner(e, g) - lam * inner(e, d), inner(e, e), beta_max)
            betas.append(beta)
            d = ((beta + lam) * d + (1 - beta) * g) / (1 + lam)
        p = p - lr * d
        out.append(p)
    return out, betas


def ref_amadamw(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0, lam=0.1):
    """P = (1 - beta_max prod beta_i)(sqrt(v_hat)+eps); beta_1 = beta_max, then
    beta_t = clip([r <g, d/P + wd x> - <e, M (g + lam P d)>]/<e, M e>, 0, beta_max), M = 1/(P (1 + lam P)),
    e = d - g; d <- ((1-beta) g + (lam P + beta) d)/(1 + lam P); x <- x(1 - lr wd) - lr d/P."""
    beta_max, b2 = betas
    out, d, v, prod, used = [], torch.zeros_like(p), torch.zeros_like(p), 1.0, []
    for t, g in enumerate(grads, 1):
        v = b2 * v + (1 - b2) * g * g
        precond = (1 - beta_max * prod) * ((v / (1 - b2**t)).sqrt() + eps)
        if t == 1:
            beta = beta_max
        else:
            e, metric = d - g, 1 / (precond * (1 + lam * precond))
            numerator = inner(g, d / precond + wd * p) - inner(e * metric, g + lam * precond * d)
            beta = clip_beta(numerator, inner(e * metric, e), beta_max)
        used.append(beta)
        d = ((1 - beta) * g + (lam * precond + beta) * d) / (1 + lam * precond)
        prod *= beta
        p = p * (1 - lr * wd) - lr * d / precond
        out.append(p)
    return out, used


def test_amsgd_second_step_by_hand():
    """g_1 = (1, 0), g_2 = (0, 1), lr constant: d_1 = g_1; e = (1, -1), ||e||^2 = 2, <g, d> = 0, <e, g> = -1,
    <e, d> = 1: beta = (0 + 1 - 0.1)/2 = 0.45 and d_2 = (0.55 d + 0.55 g)/1.1 = (0.5, 0.5)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = AMSGD([p], lr=0.1, lam=0.1)
    for g in ([1.0, 0.0], [0.0, 1.0]):
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
    assert opt.state[p]["beta"].item() == pytest.approx(0.45, rel=1e-14)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.15, -0.05], dtype=F64), rtol=1e-14, atol=0.0)


def test_amsgd_five_steps_match_the_model_per_group_with_a_changing_lr():
    params = [torch.nn.Parameter(MATRIX.clone()), torch.nn.Parameter(VECTOR.clone())]
    opt = AMSGD([{"params": params[:1], "lr": 0.1, "weight_decay": 0.05},
                 {"params": params[1:], "lam": 0.5, "beta_max": 0.6}], lr=0.03)
    lrs = [0.1, 0.1, 0.05, 0.08, 0.08]  # a schedule changes lr: r = eta_{t-1}/eta_t enters the gap
    actual = []
    for t, (gm, gv) in enumerate(zip(GRADS, VGRADS)):
        opt.param_groups[0]["lr"] = lrs[t]
        params[0].grad, params[1].grad = gm.clone(), gv.clone()
        opt.step()
        actual.append([q.detach().clone() for q in params])
    ref_m, betas_m = ref_amsgd(MATRIX, GRADS, lrs, wd=0.05)
    ref_v, betas_v = ref_amsgd(VECTOR, VGRADS, [0.03] * 5, beta_max=0.6, lam=0.5)
    check_against(actual, list(zip(ref_m, ref_v)))
    # The coefficient really moves: not stuck at a bound on these gradients.
    assert len({round(b, 6) for b in betas_m + betas_v}) > 3, (betas_m, betas_v)


def test_amadamw_five_steps_match_the_model_per_group():
    make = lambda ps: AMAdamW(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, lam=0.1)  # noqa: E731
    actual = trajectory(make, [MATRIX, VECTOR], list(zip(GRADS, VGRADS)), lr=0.2, weight_decay=0.0, lam=0.5)
    ref_m, betas_m = ref_amadamw(MATRIX, GRADS, lr=0.2, betas=(0.9, 0.99), wd=0.0, lam=0.5)
    ref_v, betas_v = ref_amadamw(VECTOR, VGRADS, lr=0.05, betas=(0.9, 0.99), wd=0.1, lam=0.1)
    check_against(actual, list(zip(ref_m, ref_v)))
    assert betas_m[0] == 0.9 and any(0 < b < 0.9 for b in betas_m[1:] + betas_v[1:])  # the clip's inside too


def test_amadamw_first_step_is_adams_when_lambda_is_zero():
    """beta_1 = beta_max, d_0 = 0: d_1 = (1 - beta_max) g and P_1 = (1 - beta_max)(|g| + eps), so the step is
    -lr g/(|g| + eps), Adam's first step."""
    g = torch.tensor([3.0, -0.5, 1e-3, -20.0], dtype=F64)
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = AMAdamW([p], lr=0.01, lam=0.0, weight_decay=0.0)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), -0.01 * g / (g.abs() + 1e-8), rtol=1e-13, atol=0.0)


def test_memory_shrinks_when_the_gradient_turns_against_it():
    """A plane whose slope (d) opposes the new gradient gets less weight: on a reversal the coefficient falls
    below beta_max, while on a steady gradient it stays at the cap."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = AMSGD([p], lr=0.1)
    steady = torch.tensor([1.0, 0.5, -0.2], dtype=F64)
    for g in (steady, steady * 1.01, steady * 1.02):
        p.grad = g.clone()
        opt.step()
    assert opt.state[p]["beta"].item() == 0.9
    p.grad = -steady
    opt.step()
    assert opt.state[p]["beta"].item() < 0.5


@pytest.mark.parametrize("make", [lambda ps: AMSGD(ps, lr=0.01), lambda ps: AMAdamW(ps, lr=0.01, weight_decay=0.0)],
                         ids=["am_sgd", "am_adamw"])
def test_converges_on_quadratic_and_rosenbrock(make):
    assert_converges(make, quadratic, [0.0] * 8, steps=500, tol=1e-5)
    assert_converges(make, rosenbrock, [-1.0, 1.0], steps=2000, tol=1e-6)


@pytest.mark.parametrize("make", [lambda ps: AMSGD(ps, lr=0.05, weight_decay=0.01),
                                  lambda ps: AMAdamW(ps, lr=0.01, weight_decay=0.1)], ids=["am_sgd", "am_adamw"])
def test_state_dict_lockstep(make):
    assert_state_dict_lockstep(make)


@pytest.mark.parametrize("cls,kwargs,bad", [
    (AMSGD, {"lr": -1.0}, "Invalid lr: -1.0"),
    (AMSGD, {"beta_max": 1.0}, "Invalid beta_max: 1.0"),
    (AMSGD, {"lam": -0.1}, "Invalid lam: -0.1"),
    (AMAdamW, {"betas": (0.9, 1.0)}, "Invalid betas"),
    (AMAdamW, {"weight_decay": -1.0}, "Invalid weight_decay: -1.0"),
])
def test_rejects_bad_hyperparameters(cls, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("option,cls", [("am_sgd", AMSGD), ("am_adamw", AMAdamW)])
def test_option_builds_it(option, cls):
    cfg = compose_cfg(f"optimizer={option}", "regularize.weight_decay=0.05")
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(opt, cls) and opt.defaults["lam"] == 0.1 and opt.defaults["weight_decay"] == 0.05
    assert math.isclose(opt.defaults.get("beta_max", opt.defaults.get("betas", [0])[0]), 0.9)
