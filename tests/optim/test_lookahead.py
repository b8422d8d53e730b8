"""Lookahead (optim/lookahead.py): slow/fast weights by hand around SGD with momentum, per-group k and alpha,
slow weights in state_dict, loss forwarding, and the Hydra syntax that picks the inner optimizer."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from optim.adalo import AdaLo
from optim.lookahead import Lookahead
from optim.nsgda import NSGDA
from schedules import Scheduler
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
)

GRADS = [MATRIX_GRADS[t % 3] * (1 + t) for t in range(7)]
VGRADS = [VECTOR_GRADS[t % 3] * (1 - 0.1 * t) for t in range(7)]


def ref_lookahead(p, grads, lr, mu, k, alpha):
    """Inner: SGD with momentum v = mu*v + g, fast -= lr*v (its state runs on across syncs). Every k steps:
    slow += alpha*(fast - slow); fast = slow."""
    out, slow, v = [], p.clone(), None
    for t, g in enumerate(grads, 1):
        v = g if v is None else mu * v + g
        p = p - lr * v
        if t % k == 0:
            slow = slow + alpha * (p - slow)
            p = slow.clone()
        out.append(p)
    return out, slow


def test_seven_steps_match_the_rule_with_per_group_k_and_alpha():
    params = [torch.nn.Parameter(MATRIX.clone()), torch.nn.Parameter(VECTOR.clone())]
    inner = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    groups = [{"params": params[:1], "k": 2, "alpha": 0.3}, {"params": params[1:]}]
    opt = Lookahead(groups, inner, k=3, alpha=0.5)
    actual = []
    for gm, gv in zip(GRADS, VGRADS):
        params[0].grad, params[1].grad = gm.clone(), gv.clone()
        opt.step()
        actual.append([p.detach().clone() for p in params])
    ref_m, slow_m = ref_lookahead(MATRIX, GRADS, lr=0.1, mu=0.9, k=2, alpha=0.3)
    ref_v, slow_v = ref_lookahead(VECTOR, VGRADS, lr=0.1, mu=0.9, k=3, alpha=0.5)
    check_against(actual, list(zip(ref_m, ref_v)))
    # The state_dict carries the slow weights (indexed like the params) and the inner optimizer's state.
    sd = opt.state_dict()
    torch.testing.assert_close(sd["slow"][0], slow_m, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sd["slow"][1], slow_v, rtol=1e-12, atol=1e-14)
    assert "momentum_buffer" in sd["inner"]["state"][0]


def test_schedules_reach_the_inner_optimizer():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lookahead([p], functools.partial(torch.optim.SGD, lr=1.0))
    sched = Scheduler(lambda step: 0.5**step, opt)  # what the trainer uses
    p.grad = torch.ones(3)
    opt.step()
    sched.step(1)
    assert opt.inner.param_groups[0]["lr"] == 0.5 and opt.param_groups is opt.inner.param_groups


def test_loss_is_forwarded_to_an_inner_optimizer_that_needs_it():
    p, q = torch.nn.Parameter(VECTOR.clone()), torch.nn.Parameter(VECTOR.clone())
    wrapped, plain = Lookahead([p], AdaLo, k=10), AdaLo([q])
    assert wrapped.requires_loss and not Lookahead([torch.nn.Parameter(torch.zeros(1))], NSGDA).requires_loss
    for g in VECTOR_GRADS:  # fewer than k steps: Lookahead is the inner optimizer alone
        p.grad, q.grad = g.clone(), g.clone()
        wrapped.step(loss=torch.tensor(0.5, dtype=torch.float64))
        plain.step(loss=torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(p, q)


def test_converges():
    make = lambda lr: lambda ps: Lookahead(ps, functools.partial(torch.optim.Adam, lr=lr))  # noqa: E731
    assert_converges(make(0.03), quadratic, [0.0] * 4, steps=1000, tol=1e-6)
    assert_converges(make(0.3), rosenbrock, [-1.2, 1.0], steps=1000, tol=1e-4)


def test_state_dict_lockstep():
    # 5 steps before the round trip with k = 3: the copy resumes between two synchronisations.
    assert_state_dict_lockstep(lambda ps: Lookahead(ps, functools.partial(torch.optim.AdamW, lr=0.01), k=3))


@pytest.mark.parametrize("kwargs,bad", [({"k": 0}, "Invalid k: 0"), ({"alpha": 0.0}, "Invalid alpha: 0.0"),
                                        ({"alpha": 1.5}, "Invalid alpha: 1.5")])
def test_rejects_bad_hyperparameters(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        Lookahead([torch.nn.Parameter(torch.zeros(2))], NSGDA, **kwargs)


def test_a_name_instead_of_an_optimizer_gets_the_hydra_syntax_in_the_error():
    with pytest.raises(ValueError, match="optimizer@optimizer.inner=sgd"):
        Lookahead([torch.nn.Parameter(torch.zeros(2))], "sgd")


def test_hydra_picks_and_tunes_the_inner_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    default = instantiate(compose_cfg("optimizer=lookahead").optimizer)(params)
    assert isinstance(default, Lookahead) and default.defaults["k"] == 5
    assert type(default.inner).__name__ == "AdamW"
    cfg = compose_cfg("optimizer=lookahead", "optimizer@optimizer.inner=nsgda", "optimizer.inner.lr=0.5",
                      "optimizer.k=7")
    opt = instantiate(cfg.optimizer)(params)
    assert isinstance(opt.inner, NSGDA) and opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["k"] == 7


@pytest.mark.parametrize("inner", ["prodigy", "dadapt_adam"])
def test_an_inner_optimizer_whose_groups_hold_k_is_refused(inner):
    """Prodigy and D-Adaptation count their steps in group['k']: lookahead's k (its sync period) would be theirs."""
    factory = instantiate(compose_cfg(f"optimizer={inner}").optimizer)
    with pytest.raises(ValueError, match=r"keeps its own k in its param groups, where lookahead keeps its settings"):
        Lookahead([torch.nn.Parameter(torch.zeros(3))], inner=factory)
