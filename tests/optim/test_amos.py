"""Amos (optim/amos.py) against the paper's update written out by hand, and its first-step closed form."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from optim.amos import Amos
from tests.conftest import compose_cfg
from tests.optim.harness import (
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


def ref_amos(p, grads, xi, eta, beta=0.999, zeta=0.25, momentum=0.0, eps=2.0**-125):
    """v: mean of g^2 per row of a matrix (one value for a vector); r = (1-beta^t)/max(v, eps);
    gamma = xi^2 r g2 / sqrt(1 + zeta sqrt(xi) b);
    u = (-xi eta sqrt(r) g - gamma p/2) / (1 + zeta sqrt(xi eta) b); b += gamma (1 + b);
    optional EMA of u; p += u."""
    out = []
    reduced = (p.shape[0], 1) if p.ndim == 2 else ()
    v, b, m = torch.zeros(reduced, dtype=p.dtype), torch.zeros(reduced, dtype=p.dtype), torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g2 = (g * g).mean(dim=1, keepdim=True) if p.ndim == 2 else (g * g).mean()
        v = beta * v + (1 - beta) * g2
        r = (1 - beta**t) / v.clamp(min=eps)
        gamma = xi**2 * r * g2 / (1 + zeta * math.sqrt(xi) * b).sqrt()
        u = (-xi * eta * r.sqrt() * g - 0.5 * gamma * p) / (1 + zeta * math.sqrt(xi * eta) * b)
        b = b + gamma * (1 + b)
        m = momentum * m + (1 - momentum) * u
        p = p + (m if momentum else u)
        out.append(p)
    return out


def test_first_three_steps_match_the_rule():
    make = lambda ps: Amos(ps, lr=0.1, beta=0.9, momentum=0.5, eta_vector=0.7)  # noqa: E731
    actual = trajectory(make, [MATRIX, VECTOR], list(zip(MATRIX_GRADS, VECTOR_GRADS)), lr=0.2, momentum=0.0)
    # MATRIX is [2, 3]: default eta = 1/sqrt(fan_in = 3); the vector uses eta_vector.
    expected = list(zip(ref_amos(MATRIX, MATRIX_GRADS, xi=0.2, eta=1 / math.sqrt(3), beta=0.9),
                        ref_amos(VECTOR, VECTOR_GRADS, xi=0.1, eta=0.7, beta=0.9, momentum=0.5)))
    check_against(actual, expected)


def test_a_group_can_set_eta():
    make = lambda ps: Amos(ps, lr=0.1)  # noqa: E731
    actual = trajectory(make, [MATRIX, VECTOR], list(zip(MATRIX_GRADS, VECTOR_GRADS)), eta=2.0)
    check_against([[a] for a, _ in actual], [[p] for p in ref_amos(MATRIX, MATRIX_GRADS, xi=0.1, eta=2.0)])


def test_first_step_closed_form():
    """With b = 0 and v_hat = g2 after one step: gamma = xi^2 exactly, whatever the gradient's scale, and
    the step is -xi*eta*g/RMS(g) - xi^2/2 * p (for a vector, whose v is one number)."""
    xi, eta = 0.05, 0.5
    p = torch.nn.Parameter(VECTOR.clone())
    opt = Amos([p], lr=xi, eta_vector=eta)
    p.grad = VECTOR_GRADS[0] * 1000.0
    opt.step()
    g = VECTOR_GRADS[0]
    expected = -xi * eta * g / g.pow(2).mean().sqrt() - xi**2 / 2 * VECTOR
    torch.testing.assert_close(p.detach() - VECTOR, expected, rtol=1e-10, atol=1e-15)
    assert opt.state[p]["b"].item() == pytest.approx(xi**2, rel=1e-12)


def test_converges():
    assert_converges(lambda ps: Amos(ps, lr=0.1), quadratic, [0.0] * 4, steps=1000, tol=1e-6)
    assert_converges(lambda ps: Amos(ps, lr=1.0), rosenbrock, [-1.2, 1.0], steps=2000, tol=1e-2)


def test_state_dict_lockstep():
    assert_state_dict_lockstep(lambda ps: Amos(ps, lr=0.05, momentum=0.9))


@pytest.mark.parametrize("kwargs,bad", [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"beta": 1.0}, "Invalid beta: 1.0"),
    ({"momentum": -0.1}, "Invalid momentum: -0.1"),
    ({"eps": 0.0}, "Invalid eps: 0.0"),
    ({"eta_scale": 0.0}, "Invalid eta_scale: 0.0"),
])
def test_rejects_bad_hyperparameters(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        Amos([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_option_builds_it():
    opt = instantiate(compose_cfg("optimizer=amos").optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(opt, Amos) and opt.defaults["beta"] == 0.999


def test_norm_scales_get_eta_norm_and_biases_eta_vector_as_in_the_authors_examples():
    """jestimator/models/bert/modeling.py get_eta_fn: ('layer_norm', 'scale') -> 1.0, 'bias' -> 0.5. One step
    from v = b = 0 and p = 0 moves every entry by xi*eta (r*g2 = 1 for a constant |g|; the decay term gamma*p/2
    vanishes at p = 0)."""
    from optim.param_groups import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = Amos(param_groups(model), lr=0.01)
    for p in model.parameters():
        p.detach().zero_()
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    moves = {name: ((before[i] - p.detach()).abs().mean() / 0.01).item()
             for i, (name, p) in enumerate(model.named_parameters())}
    assert moves["1.weight"] == pytest.approx(1.0, rel=1e-6)  # the LayerNorm scale: eta_norm
    assert moves["1.bias"] == pytest.approx(0.5, rel=1e-6) and moves["0.bias"] == pytest.approx(0.5, rel=1e-6)
    assert moves["0.weight"] == pytest.approx(1.0 / math.sqrt(4), rel=1e-6)  # eta_scale/sqrt(fan_in)
