"""Grunwald-Letnikov fractional gradient (optim/fractional.py): the coefficients against the binomial definition
(scipy), the update over a wrapping window by hand, its closed form on a constant gradient, Zhou et al.'s variant
(coefficients as a product, one memory term dropped per step), convergence and state_dict lock-step."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from scipy.special import binom

from optim.fractional import GLFractional, gl_weights
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
    stepped,
    trajectory,
)

GRADS = [MATRIX_GRADS[t % 3] * (1 + 0.2 * t) for t in range(8)]
VGRADS = [VECTOR_GRADS[t % 3] * (1 - 0.1 * t) for t in range(8)]


def gl(order: float, k: int) -> float:
    """(-1)^k binom(order, k), the Grunwald-Letnikov coefficient, from the Gamma-function binomial."""
    return (-1) ** k * float(binom(order, k))


def ref_gl(p, grads, lr, order, window, wd=0.0):
    """p -= lr * sum_{k < window} (-1)^k binom(order, k) g_{t-k}, g_i = grad_i + wd*p_i (missing g before step 1)."""
    out, seen = [], []
    for g in grads:
        seen.append(g + wd * p)
        direction = sum(gl(order, k) * seen[-1 - k] for k in range(min(window, len(seen))))
        p = p - lr * direction
        out.append(p)
    return out


@pytest.mark.parametrize("order", [-0.9, -0.5, 0.0, 0.3, 0.5])
def test_coefficients_are_the_grunwald_letnikov_binomials(order):
    assert gl_weights(order, 12) == pytest.approx([gl(order, k) for k in range(12)], rel=1e-13, abs=1e-15)


def test_eight_steps_over_a_wrapping_window_match_the_definition_per_group():
    make = lambda ps: GLFractional(ps, lr=0.05, order=-0.5, window=3)  # noqa: E731
    actual = trajectory(make, [MATRIX, VECTOR], list(zip(GRADS, VGRADS)), lr=0.1, order=0.4, window=5,
                        weight_decay=0.2)
    expected = list(zip(ref_gl(MATRIX, GRADS, lr=0.1, order=0.4, window=5, wd=0.2),
                        ref_gl(VECTOR, VGRADS, lr=0.05, order=-0.5, window=3)))
    check_against(actual, expected)


def test_constant_gradient_steps_by_the_sum_of_the_weights():
    """With g constant the t-th step is lr*g*sum_{k<min(t, K)} w_k; once the window is full,
    sum_{k<K} (-1)^k binom(a, k) = binom(K - 1 - a, K - 1) (3.52 at a = -0.5, K = 10)."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = GLFractional([p], lr=0.1, order=-0.5, window=10)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for _ in range(12):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach() - before, -0.1 * binom(9.5, 9) * g, rtol=1e-13, atol=0.0)
    assert binom(9.5, 9) == pytest.approx(3.5239, abs=1e-4)


def test_order_zero_and_window_one_are_plain_sgd():
    starts, grads = [MATRIX, VECTOR], list(zip(GRADS, VGRADS))
    sgd = trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1), starts, grads)
    check_against(trajectory(lambda ps: GLFractional(ps, lr=0.1, order=0.0), starts, grads), sgd)
    check_against(trajectory(lambda ps: GLFractional(ps, lr=0.1, order=0.7, window=1), starts, grads), sgd)


def test_state_is_window_minus_one_gradients():
    p = torch.nn.Parameter(torch.zeros(4, 5))
    opt = GLFractional([p], window=10)
    p.grad = torch.ones(4, 5)
    opt.step()
    assert opt.state[p]["history"].shape == (9, 4, 5)


@pytest.mark.parametrize("order,lr", [(-0.5, 0.002), (0.3, 0.01)])
def test_converges_on_a_quadratic(order, lr):
    assert_converges(lambda ps: GLFractional(ps, lr=lr, order=order), quadratic, [0.0] * 8, steps=1500, tol=1e-5)


def test_long_memory_converges_on_rosenbrock():
    assert_converges(lambda ps: GLFractional(ps, lr=0.002), rosenbrock, [-1.0, 1.0], steps=3000, tol=1e-2)


def test_state_dict_lockstep():
    assert_state_dict_lockstep(lambda ps: GLFractional(ps, lr=0.02, window=3, weight_decay=0.01))


@pytest.mark.parametrize("kwargs,bad", [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"order": 1.0}, "Invalid order: 1.0"),
    ({"order": -1.0}, "Invalid order: -1.0"),
    ({"window": 0}, "Invalid window: 0"),
])
def test_rejects_bad_hyperparameters(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        GLFractional([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_option_builds_it():
    cfg = compose_cfg("optimizer=gl_fractional", "optimizer.order=0.3")
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(opt, GLFractional) and opt.defaults["order"] == 0.3 and opt.defaults["window"] == 10


# -- rule="zhou": w_j = prod_{i=2}^{j+1} (1 - (a+1)/i), one random memory term dropped per step ----------------
def zhou_weight(order: float, j: int) -> float:
    """w_j of FCGD_G-L in closed form (the recursion w_j = w_{j-1}(1 - (a+1)/(j+1)) unrolled)."""
    return math.prod(1 - (order + 1) / i for i in range(2, j + 2))


def test_zhou_rule_matches_its_closed_form_without_the_drop():
    order, window = 0.4, 4
    p = torch.nn.Parameter(MATRIX.clone())
    got = stepped(GLFractional([p], lr=0.1, order=order, window=window, rule="zhou"), [p], [[g] for g in GRADS])
    want, x = [], MATRIX.clone()
    for t in range(len(GRADS)):
        x = x - 0.1 * sum(zhou_weight(order, j) * GRADS[t - j] for j in range(min(window, t + 1)))
        want.append([x])
    check_against(got, want)
    assert all(zhou_weight(order, j) > 0 for j in range(1, 10)) and zhou_weight(1.0, 1) == 0.0  # a = 1: SGD


def test_zhou_drop_leaves_out_exactly_one_memory_term_per_step_and_resumes_identically():
    order, window = 0.5, 4
    p = torch.nn.Parameter(VECTOR.clone())
    opt = GLFractional([p], lr=0.1, order=order, window=window, rule="zhou", drop=True, seed=3)
    x, dropped = VECTOR.clone(), []
    for t, g in enumerate(VGRADS):
        p.grad = g.clone()
        opt.step()
        terms = {j: zhou_weight(order, j) * VGRADS[t - j] for j in range(min(window, t + 1))}
        candidates = [j for j in range(1, window)  # the update equals the full sum less one memory term
                      if torch.allclose(p.detach(), x - 0.1 * (sum(terms.values()) - terms.get(j, 0.0)),
                                        rtol=1e-12, atol=1e-14)]
        assert candidates, f"step {t}: no single dropped term explains the update"
        dropped.append(candidates)
        x = p.detach().clone()
    assert len({c[0] for c in dropped[3:]}) > 1  # the dropped term changes from step to step
    assert_state_dict_lockstep(lambda ps: GLFractional(ps, lr=0.02, order=0.5, window=4, rule="zhou", drop=True))


@pytest.mark.parametrize("kwargs,bad", [({"rule": "zhou", "order": -0.5}, "Invalid order: -0.5"),
                                        ({"drop": True}, "Invalid drop: True"), ({"rule": "gl"}, "Invalid rule")])
def test_zhou_rule_rejects_what_it_does_not_define(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        GLFractional([torch.nn.Parameter(torch.zeros(2))], **kwargs)
