"""AdamW^2 (optim/adamw2.py): the per-matrix step bound against AdamW with exact singular values (torch.linalg),
a first step worked by hand, the Weyl guarantee sigma_1(W_t) <= (1 + tau) sigma_1(W_{t-1}), convergence and
state_dict lock-step."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from optim.adamw2 import AdamW2, top_singular_value
from tests.conftest import compose_cfg
from tests.optim.harness import (
    CAUTION,
    F64,
    _caution,
    _decay,
    assert_converges,
    assert_state_dict_lockstep,
    check_against,
    quadratic,
    rosenbrock,
    trajectory,
)


def sigma1(a: torch.Tensor) -> float:
    """The largest singular value, by SVD (torch.linalg), of the [shape[0], -1] view."""
    return float(torch.linalg.matrix_norm(a.reshape(a.shape[0], -1), ord=2))


def ref_adamw2(p, grads, lr, tau, betas=(0.9, 0.999), eps=1e-8, wd=0.0, cautious=False, cautious_wd=False):
    """AdamW's u = m_hat/(sqrt(v_hat)+eps) (masked with the cautious option); for a matrix,
    rate = min(lr, tau sigma_1(W)/sigma_1(u)) with exact singular values; p <- p - rate*(u + wd p), the decay only
    where u*p >= 0 with cautious_wd. Returns the params and the rates."""
    b1, b2 = betas
    m, v, out, rates = torch.zeros_like(p), torch.zeros_like(p), [], []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        if cautious:
            u = _caution(u, g)
        rate = min(lr, tau * sigma1(p) / sigma1(u)) if p.ndim >= 2 else lr
        p = p - rate * (u + _decay(p, u, wd, cautious_wd))
        out.append(p)
        rates.append(rate)
    return out, rates


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    starts = [0.1 * torch.randn(5, 4, generator=g, dtype=F64), torch.randn(3, 2, 2, generator=g, dtype=F64),
              torch.randn(4, generator=g, dtype=F64)]
    grads = [[torch.randn(s.shape, generator=g, dtype=F64) + 0.5 for s in starts] for _ in range(4)]
    return starts, grads


@pytest.mark.parametrize("caution", CAUTION, ids=["plain", "cautious", "cautious_wd", "both"])
def test_four_steps_match_adamw_with_the_exact_bound_per_group(caution):
    """Group 0 (a [5, 4] matrix, small tau): the bound is active; group 1 (a conv-shaped [3, 2, 2] weight and a
    vector, large tau): plain AdamW. 30 power iterations per step: converged on these sizes."""
    starts, grads = _data()
    make = lambda ps: AdamW2([{"params": ps[:1], "tau": 0.02},  # noqa: E731
                              {"params": ps[1:], "tau": 10.0, "weight_decay": 0.2}],
                             lr=0.05, weight_decay=0.1, power_iters=30, **caution)
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    opt = make(params)
    actual = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        actual.append([p.detach().clone() for p in params])
    ref0, rates0 = ref_adamw2(starts[0], [g[0] for g in grads], lr=0.05, tau=0.02, wd=0.1, **caution)
    ref1, rates1 = ref_adamw2(starts[1], [g[1] for g in grads], lr=0.05, tau=10.0, wd=0.2, **caution)
    ref2, _ = ref_adamw2(starts[2], [g[2] for g in grads], lr=0.05, tau=10.0, wd=0.2, **caution)
    check_against(actual, list(zip(ref0, ref1, ref2)), rtol=1e-9, atol=1e-12)
    assert all(r < 0.05 for r in rates0) and all(r == 0.05 for r in rates1)  # the bound binds in group 0 only


@pytest.mark.parametrize("caution", CAUTION, ids=["plain", "cautious", "cautious_wd", "both"])
def test_same_shaped_matrices_each_get_their_own_bound(caution):
    """Matrices of one shape are stepped side by side (optim/adamw2.py stacks them): each still gets the rate of
    its own singular values. Three [6, 4] weights at scales 0.01, 1 and 100 (the bound binds hard, a little, not
    at all), a [4, 6] one and a vector, against the per-matrix reference with exact singular values; a weight
    that has no gradient at step 3 is left alone that step."""
    g = torch.Generator().manual_seed(3)
    starts = [scale * torch.randn(6, 4, generator=g, dtype=F64) for scale in (0.01, 1.0, 100.0)]
    starts += [torch.randn(4, 6, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    grads = [[torch.randn(s.shape, generator=g, dtype=F64) for s in starts] for _ in range(5)]
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    opt = AdamW2(params, lr=0.05, tau=0.05, weight_decay=0.1, power_iters=40, **caution)
    for t, step_grads in enumerate(grads):
        for k, (p, grad) in enumerate(zip(params, step_grads)):
            p.grad = None if (t == 2 and k == 1) else grad.clone()
        opt.step()
    for k, start in enumerate(starts):
        mine = [gr[k] for t, gr in enumerate(grads) if not (t == 2 and k == 1)]
        ref, rates = ref_adamw2(start, mine, lr=0.05, tau=0.05, wd=0.1, **caution)
        torch.testing.assert_close(params[k].detach(), ref[-1], rtol=1e-9, atol=1e-12)
        if k == 0:
            assert max(rates) < 0.05  # the bound binds for the small matrix ...
        if k == 2:
            assert min(rates) == 0.05  # ... and not for the large one


def test_power_iteration_on_a_stack_matches_each_matrix():
    torch.manual_seed(2)
    a = torch.randn(3, 7, 5, dtype=F64) * torch.tensor([0.5, 1.0, 4.0], dtype=F64).view(3, 1, 1)
    a[1] = 0.0
    v = torch.nn.functional.normalize(torch.ones(3, 5, dtype=F64), dim=1)
    sigma = top_singular_value(a, v, 200)
    assert sigma.shape == (3,)
    assert sigma[0].item() == pytest.approx(sigma1(a[0]), rel=1e-12)
    assert sigma[1].item() == 0.0 and torch.equal(v[1], torch.nn.functional.normalize(torch.ones(5, dtype=F64), dim=0))
    assert sigma[2].item() == pytest.approx(sigma1(a[2]), rel=1e-12)


def test_first_step_by_hand():
    """Step 1: u = g/(|g| + eps) ~ sign(g). For g = a b^T with sign(a) = (1, -1, 1), sign(b) = (1, 1, -1, 1),
    sign(g) is rank one with sigma_1 = sqrt(3*4); W = diag(2, 1, 0.5) padded to [3, 4] has sigma_1 = 2. So
    rate = min(lr, tau*2/sqrt(12)) and W_1 = W - rate*sign(g) (eps = 0)."""
    w = torch.zeros(3, 4, dtype=F64)
    w[0, 0], w[1, 1], w[2, 2] = 2.0, 1.0, 0.5
    g = torch.outer(torch.tensor([1.0, -2.0, 0.5], dtype=F64), torch.tensor([3.0, 0.1, -1.0, 2.0], dtype=F64))
    p = torch.nn.Parameter(w.clone())
    opt = AdamW2([p], lr=1.0, eps=0.0, weight_decay=0.0, tau=0.01)
    p.grad = g
    opt.step()
    rate = 0.01 * 2.0 / math.sqrt(12.0)
    torch.testing.assert_close(p.detach(), w - rate * torch.sign(g), rtol=1e-12, atol=1e-14)


def test_the_top_singular_value_grows_by_at_most_a_factor_one_plus_tau_per_step():
    """Weyl: sigma_1(W_t) <= sigma_1(W_{t-1}) + rate*sigma_1(u) <= (1 + tau) sigma_1(W_{t-1}), at a learning rate
    where AdamW multiplies sigma_1 many times over in a few steps."""
    torch.manual_seed(0)
    w0 = 0.02 * torch.randn(16, 12, dtype=F64)
    grads = [torch.randn(16, 1, dtype=F64) @ torch.randn(1, 12, dtype=F64) + 0.1 * torch.randn(16, 12, dtype=F64)
             for _ in range(20)]  # nearly rank one, as early Transformer gradients are
    for make, within in ((lambda ps: AdamW2(ps, lr=0.1, tau=0.05, weight_decay=0.0, power_iters=3), True),
                         (lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.0), False)):
        sigmas = [sigma1(w0)] + [sigma1(s[0]) for s in trajectory(make, [w0], [[g] for g in grads])]
        growth = max(b / a for a, b in zip(sigmas, sigmas[1:]))
        assert (growth <= 1.05 + 1e-6) == within, growth


def test_power_iteration_finds_the_top_singular_value_and_keeps_its_vector():
    torch.manual_seed(1)
    a = torch.randn(7, 5, dtype=F64)
    v = torch.nn.functional.normalize(torch.ones(5, dtype=F64), dim=0)
    assert top_singular_value(a, v, 100).item() == pytest.approx(sigma1(a), rel=1e-12)
    assert top_singular_value(a, v, 1).item() == pytest.approx(sigma1(a), rel=1e-12)  # warm: one suffices
    assert top_singular_value(torch.zeros(3, 5, dtype=F64), v.clone(), 2).item() == 0.0


def test_zero_matrix_takes_adamws_step():
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=F64))
    opt = AdamW2([p], lr=0.01, tau=0.01, weight_decay=0.0)
    g = torch.arange(12, dtype=F64).view(3, 4) - 5.5
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), -0.01 * g / (g.abs() + 1e-8), rtol=1e-13, atol=0.0)


def test_converges_on_quadratic_and_rosenbrock():
    make = lambda ps: AdamW2(ps, lr=0.01, tau=0.1, weight_decay=0.0)  # noqa: E731  ([1, n]: a matrix)
    assert_converges(make, quadratic, [0.0] * 8, steps=500, tol=1e-8)
    assert_converges(make, rosenbrock, [-1.0, 1.0], steps=2000, tol=1e-8)


def test_state_dict_lockstep():
    assert_state_dict_lockstep(lambda ps: AdamW2(ps, lr=0.05, tau=0.02, weight_decay=0.1, cautious=True,
                                                 cautious_wd=True))


@pytest.mark.parametrize("kwargs,bad", [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"tau": 0.0}, "Invalid tau: 0.0"),
    ({"power_iters": 0}, "Invalid power_iters: 0"),
    ({"betas": (0.9, 1.0)}, "Invalid beta2: 1.0"),
])
def test_rejects_bad_hyperparameters(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        AdamW2([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_option_builds_it():
    cfg = compose_cfg("optimizer=adamw2", "regularize.weight_decay=0.1")
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(opt, AdamW2) and opt.defaults["weight_decay"] == 0.1 and opt.defaults["power_iters"] == 1
