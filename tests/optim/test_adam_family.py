"""The Adam family of issue 3 (optim/adamw, lion, lamb, adam_atan2, adam_softplus, adams, diffgrad, adamomentum,
adanorm) and the cautious options (optim/cautious.py).

Each optimizer is checked three ways: its first three float64 steps against a reference written out below from the
paper's rule (plain tensor arithmetic, never a call into optim/), convergence on a quadratic and on Rosenbrock's
function, and state_dict lock-step. The reference runs on two tensors in two param groups with different
hyperparameters, so per-group settings are checked too.
"""

from __future__ import annotations

import math

import pytest
import torch

from optim.adam_atan2 import AdamAtan2
from optim.adam_softplus import AdamSoftplus
from optim.adamomentum import AdaMomentum
from optim.adams import AdamS
from optim.adamw import AdamW, adamw
from optim.adanorm import AdaNorm
from optim.diffgrad import DiffGrad
from optim.lamb import Lamb
from optim.lion import Lion
from tests.conftest import compose_cfg
from tests.optim.harness import (
    CAUTION,
    _caution,
    _decay,
    assert_converges,
    assert_state_dict_lockstep,
    quadratic,
    rosenbrock,
    stepped,
)

F64 = torch.float64


# -- fixtures of the reference tests --------------------------------------------------------------------------
def _starts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)]


def _grads(scales: tuple[float, ...] = (1.0, 1.0, 1.0)) -> list[list[torch.Tensor]]:
    """Three steps of gradients for the two tensors; magnitudes span 1e-3..1 so both softplus branches and sign
    disagreements between momentum and gradient occur."""
    g = torch.Generator().manual_seed(2)
    mags = [torch.logspace(-3, 0, 6, dtype=F64).view(2, 3), torch.logspace(0, -3, 4, dtype=F64)]
    return [[torch.randn(m.shape, generator=g, dtype=F64) * m * s for m in mags] for s in scales]


def _run(make, starts, grads) -> list[list[torch.Tensor]]:
    """Set the given gradients and step; returns the parameters after each step."""
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    return stepped(make(params), params, grads)


def _two_groups(cls, group0: dict, group1: dict):
    """make(params) with params[0] in a group using the constructor's settings and params[1] in a group
    overriding `group1`."""
    return lambda params: cls([{"params": [params[0]]}, {"params": [params[1]], **group1}], **group0)


def _assert_matches(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> None:
    for step, (g_step, w_step) in enumerate(zip(got, want), 1):
        for i, (g, w) in enumerate(zip(g_step, w_step)):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=f"tensor {i} after step {step}")


def _per_tensor(ref, starts, grads, hps: list[dict]) -> list[list[torch.Tensor]]:
    """Run a one-tensor reference on each tensor with its group's hyperparameters; regroup by step."""
    traces = [ref(s, [g[i] for g in grads], **hp) for i, (s, hp) in enumerate(zip(starts, hps))]
    return [list(step) for step in zip(*traces)]


# -- hand references of the published rules ------------------------------------------------------------------
def ref_adamw(p, grads, lr, betas, eps, weight_decay, cautious=False, cautious_wd=False):
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        if cautious:
            u = _caution(u, g)
        p = p - lr * _decay(p, u, weight_decay, cautious_wd) - lr * u
        out.append(p)
    return out


def ref_lion(p, grads, lr, betas, weight_decay, cautious=False, cautious_wd=False):
    b1, b2 = betas
    m, out = torch.zeros_like(p), []
    for g in grads:
        u = torch.sign(b1 * m + (1 - b1) * g)
        if cautious:
            u = _caution(u, g)
        p = p - lr * (u + _decay(p, u, weight_decay, cautious_wd))
        m = b2 * m + (1 - b2) * g
        out.append(p)
    return out


def ref_lamb(p, grads, lr, betas, eps, weight_decay, cautious=False, cautious_wd=False, always_adapt=False):
    """LAMB (1904.00962) as timm's and NVIDIA apex's default runs it: the trust ratio ||p||/||r|| only where weight
    decay applies (timm: `if weight_decay != 0 or always_adapt`), 1 where either norm is zero."""
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        if cautious:
            u = _caution(u, g)
        r = u + _decay(p, u, weight_decay, cautious_wd)
        p_norm, r_norm = math.sqrt((p * p).sum().item()), math.sqrt((r * r).sum().item())
        trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
        p = p - lr * (trust if weight_decay != 0 or always_adapt else 1.0) * r
        out.append(p)
    return out


def ref_adam_atan2(p, grads, lr, betas, weight_decay, a=1.27, b=1.0, cautious=False, cautious_wd=False):
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = a * torch.atan2(m / (1 - b1**t), b * torch.sqrt(v / (1 - b2**t)))
        if cautious:
            u = _caution(u, g)
        p = p - lr * _decay(p, u, weight_decay, cautious_wd) - lr * u
        out.append(p)
    return out


def ref_adam_softplus(p, grads, lr, betas, weight_decay, softplus_beta, threshold, cautious=False,
                      cautious_wd=False):
    """The authors' Sadam (optimizer/Sadam.py in github.com/neilliang90/Sadam, amsgrad off): softplus of the raw
    sqrt(v), the bias corrections in the step size lr*sqrt(1-b2^t)/(1-b1^t); decay decoupled as in AdamW."""
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = torch.sqrt(v)
        smooth = torch.log(1 + torch.exp(softplus_beta * x)) / softplus_beta  # log(1 + e^(beta x))/beta
        den = torch.where(softplus_beta * x > threshold, x, smooth)
        u = math.sqrt(1 - b2**t) / (1 - b1**t) * m / den
        if cautious:
            u = _caution(u, g)
        p = p - lr * _decay(p, u, weight_decay, cautious_wd) - lr * u
        out.append(p)
    return out


def ref_diffgrad(p, grads, lr, betas, eps, weight_decay):
    b1, b2 = betas
    m, v, prev, out = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        xi = 1 / (1 + torch.exp(-torch.abs(prev - g)))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * weight_decay * p - lr * xi * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        prev = g
        out.append(p)
    return out


def ref_adamomentum(p, grads, lr, betas, eps, weight_decay):
    b1, b2 = betas
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * m * m + eps
        p = p - lr * weight_decay * p - lr * (m / (1 - b1**t)) / torch.sqrt(v / (1 - b2**t))
        out.append(p)
    return out


def ref_adanorm(p, grads, lr, betas, eps, weight_decay, gamma, corrected_steps: list | None = None):
    b1, b2 = betas
    m, v, e, out = torch.zeros_like(p), torch.zeros_like(p), 0.0, []
    for t, g in enumerate(grads, 1):
        norm = math.sqrt((g * g).sum().item())
        e = gamma * e + (1 - gamma) * norm
        s = g * (e / norm) if e > norm else g
        if corrected_steps is not None and e > norm:
            corrected_steps.append(t)
        m = b1 * m + (1 - b1) * s
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * weight_decay * p - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        out.append(p)
    return out


def ref_adams(starts, grads, hps, cautious=False, cautious_wd=False):
    """AdamS over the whole model: v_bar is the mean of v_hat over every element of both tensors; the decay
    wd/sqrt(v_bar)*p is decoupled, so the cautious options act on it as on AdamW's."""
    ps = [s.clone() for s in starts]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    out = []
    for t, step_grads in enumerate(grads, 1):
        for i, (g, hp) in enumerate(zip(step_grads, hps)):
            b1, b2 = hp["betas"]
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
        v_hats = [v / (1 - hp["betas"][1] ** t) for v, hp in zip(vs, hps)]
        v_bar = torch.cat([vh.flatten() for vh in v_hats]).mean().item()
        for i, hp in enumerate(hps):
            u = (ms[i] / (1 - hp["betas"][0] ** t)) / (torch.sqrt(v_hats[i]) + hp["eps"])
            if cautious:
                u = _caution(u, step_grads[i])
            decay = _decay(ps[i], u, hp["weight_decay"] / math.sqrt(v_bar), cautious_wd)
            ps[i] = ps[i] - hp["lr"] * decay - hp["lr"] * u
        out.append([p.clone() for p in ps])
    return out


# -- first three steps against the references -----------------------------------------------------------------

# (optimizer class, reference, group-0 hyperparameters, group-1 overrides)
FAMILY = {
    "adamw": (AdamW, ref_adamw, dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
              dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.5)),
    "lion": (Lion, ref_lion, dict(lr=0.1, betas=(0.9, 0.99), weight_decay=0.1),
             dict(lr=0.03, betas=(0.5, 0.9), weight_decay=0.5)),
    "lamb": (Lamb, ref_lamb, dict(lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1),
             dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.5)),
    "adam_atan2": (AdamAtan2, ref_adam_atan2, dict(lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, a=1.27, b=1.0),
                   dict(lr=0.03, weight_decay=0.5, a=2.0, b=0.5)),
}


@pytest.mark.parametrize("caution", CAUTION, ids=["plain", "cautious", "cautious_wd", "both"])
@pytest.mark.parametrize("name", list(FAMILY))
def test_first_three_steps_match_the_published_rule(name, caution):
    cls, ref, hp0, hp1 = FAMILY[name]
    starts, grads = _starts(), _grads()
    got = _run(_two_groups(cls, {**hp0, **caution}, hp1), starts, grads)
    want = _per_tensor(ref, starts, grads, [{**hp0, **caution}, {**hp0, **caution, **hp1}])
    _assert_matches(got, want)


@pytest.mark.parametrize("name", list(FAMILY) + ["adam_softplus", "adams"])
def test_each_cautious_option_changes_the_reference(name):
    """Guards the reference tests of the cautious options: on their gradients each option changes the reference's
    own trajectory (its masks switch coordinates off), so an implementation whose option did nothing could not
    match it."""
    starts, grads = _starts(), _grads()
    if name == "adams":
        hp = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
        runs = [ref_adams(starts, grads, [hp, hp], **c)[-1] for c in CAUTION]
    else:
        ref, hp = (ref_adam_softplus, SOFTPLUS[0]) if name == "adam_softplus" else FAMILY[name][1:3]
        runs = [_per_tensor(ref, starts, grads, [{**hp, **c}] * 2)[-1] for c in CAUTION]
    for c, run in zip(CAUTION[1:], runs[1:]):
        assert all(not torch.equal(a, b) for a, b in zip(run, runs[0])), c


SOFTPLUS = (dict(lr=0.1, betas=(0.9, 0.999), weight_decay=0.1, softplus_beta=50.0, threshold=20.0),
            dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.5, softplus_beta=300.0, threshold=2.0))  # both branches


@pytest.mark.parametrize("caution", CAUTION, ids=["plain", "cautious", "cautious_wd", "both"])
def test_adam_softplus_first_three_steps(caution):
    hp0, hp1 = SOFTPLUS
    starts, grads = _starts(), _grads()
    got = _run(_two_groups(AdamSoftplus, {**hp0, **caution}, hp1), starts, grads)
    _assert_matches(got, _per_tensor(ref_adam_softplus, starts, grads, [{**hp0, **caution},
                                                                        {**hp0, **caution, **hp1}]))


def test_adam_softplus_first_step_in_closed_form():
    """Step 1: m = (1-b1)g, sqrt(v) = sqrt(1-b2)|g|, step size lr*sqrt(1-b2)/(1-b1), so
    p1 = -lr*sqrt(1-b2)*g / softplus_50(sqrt(1-b2)|g|). For |g| <= 0.1 the softplus floor log(2)/50 dominates
    and the step is far below lr (softplus of the bias-corrected sqrt(v_hat) = |g| gave steps near lr)."""
    g = torch.tensor([0.1, -0.01, 1e-3, -5.0], dtype=F64)
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = AdamSoftplus([p], lr=0.01, betas=(0.9, 0.999), softplus_beta=50.0)
    p.grad = g.clone()
    opt.step()
    x = math.sqrt(0.001) * g.abs()
    want = -0.01 * math.sqrt(0.001) * g / (torch.log1p(torch.exp(50.0 * x)) / 50.0)
    torch.testing.assert_close(p.detach(), want, rtol=1e-13, atol=0.0)
    assert (p.detach()[:3].abs() < 0.01 * 0.25).all()  # small gradients: a fraction of lr


def test_diffgrad_first_three_steps():
    hp0 = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    hp1 = dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.0)
    starts, grads = _starts(), _grads()
    got = _run(_two_groups(DiffGrad, hp0, hp1), starts, grads)
    _assert_matches(got, _per_tensor(ref_diffgrad, starts, grads, [hp0, {**hp0, **hp1}]))


def test_adamomentum_first_three_steps():
    hp0 = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    hp1 = dict(lr=0.03, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.0)
    starts, grads = _starts(), _grads()
    got = _run(_two_groups(AdaMomentum, hp0, hp1), starts, grads)
    _assert_matches(got, _per_tensor(ref_adamomentum, starts, grads, [hp0, {**hp0, **hp1}]))


def test_adanorm_first_three_steps_including_the_norm_correction():
    hp0 = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, gamma=0.95)
    hp1 = dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.0, gamma=0.5)
    starts, grads = _starts(), _grads(scales=(1.0, 1.0, 0.01))  # a sudden drop of ||g||: e_t > ||g_t|| at step 3
    corrected: list[int] = []
    want = _per_tensor(lambda *a, **k: ref_adanorm(*a, **k, corrected_steps=corrected), starts, grads,
                       [hp0, {**hp0, **hp1}])
    assert corrected == [3, 3], "the reference must exercise the e_t > ||g_t|| branch"
    _assert_matches(_run(_two_groups(AdaNorm, hp0, hp1), starts, grads), want)


@pytest.mark.parametrize("caution", CAUTION, ids=["plain", "cautious", "cautious_wd", "both"])
def test_adams_first_three_steps_with_whole_model_second_moment(caution):
    hp0 = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    hp1 = dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.5)
    starts, grads = _starts(), _grads()
    got = _run(_two_groups(AdamS, {**hp0, **caution}, hp1), starts, grads)
    _assert_matches(got, ref_adams(starts, grads, [hp0, {**hp0, **hp1}], **caution))


# -- closed forms ---------------------------------------------------------------------------------------------
def test_adam_first_step_is_minus_lr_times_sign_of_the_gradient():
    g = torch.tensor([3.0, -0.5, 1e-3, -20.0], dtype=F64)
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = AdamW([p], lr=0.01, eps=1e-8, weight_decay=0.0, cautious=True)  # at step 1 u = g/|g|: nothing masked
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), -0.01 * torch.sign(g), rtol=1e-4, atol=0.0)


def test_adam_atan2_first_step_and_gradient_scale_invariance():
    g = torch.tensor([3.0, -0.5, 1e-3, -20.0], dtype=F64)
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = AdamAtan2([p], lr=0.01, a=1.27, b=1.0)
    p.grad = g.clone()
    opt.step()  # m_hat = g, sqrt(v_hat) = |g|: u = a*atan2(g, |g|) = a*pi/4*sign(g)
    torch.testing.assert_close(p.detach(), -0.01 * 1.27 * math.pi / 4 * torch.sign(g), rtol=1e-13, atol=0.0)

    starts, grads = _starts(), _grads()
    make = _two_groups(AdamAtan2, dict(lr=0.1, weight_decay=0.1), dict(lr=0.03))
    base = _run(make, starts, grads)
    for c in (1e-6, 1e4):
        scaled = _run(make, starts, [[c * g for g in step] for step in grads])
        _assert_matches(scaled, base)


@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_adam_with_eps_is_not_scale_invariant(scale):
    """The contrast that makes the atan2 test meaningful. Adam's first step with gradient c*g is
    -lr*c*g/(c*|g| + eps) (m_hat = c*g, sqrt(v_hat) = c*|g|): sign(g) while c*|g| >> eps, shrunk where it is
    not, so tiny gradients change the step where atan2's a*pi/4*sign(g) stays."""
    g = torch.tensor([1.0, -1e-2, 1e-3, -1e-4], dtype=F64)
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = AdamW([p], lr=0.1, eps=1e-8, weight_decay=0.0)
    p.grad = scale * g
    opt.step()
    want = -0.1 * scale * g / (scale * g.abs() + 1e-8)
    torch.testing.assert_close(p.detach(), want, rtol=1e-13, atol=0.0)
    if scale < 1:  # 1e-10 against eps 1e-8: about 1% of a step
        assert abs(want[3].item()) < 0.002


def test_cautious_mask_zeroes_disagreeing_coordinates_and_rescales_the_rest():
    """Step 2 with hand-picked moments: u = m_hat/sqrt(v_hat) disagrees with g in coordinate 1 only."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = AdamW([p], lr=1.0, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0, cautious=True)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, -0.01, 2.0, 0.5], dtype=F64)  # m stays > 0 everywhere: coordinate 1 disagrees
    opt.step()
    moved = p.detach() - before
    assert moved[1] == 0.0
    b1, b2 = 0.9, 0.999
    g1, g2 = torch.ones(4, dtype=F64), p.grad
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    u = (m / (1 - b1**2)) / torch.sqrt(v / (1 - b2**2))
    expected = -u * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64) / 0.75  # 3 of 4 kept: rescaled by 4/3
    torch.testing.assert_close(moved, expected, rtol=1e-12, atol=1e-15)


def test_cautious_weight_decay_skips_coordinates_where_update_and_parameter_disagree():
    p = torch.nn.Parameter(torch.tensor([2.0, -2.0, 2.0, -2.0], dtype=F64))
    opt = AdamW([p], lr=0.1, eps=0.0, weight_decay=0.5, cautious_wd=True)
    p.grad = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64)  # first step u = sign(g)
    opt.step()
    # decayed where u*p >= 0 (coordinates 0 and 3): p - lr*wd*p - lr*u; elsewhere only p - lr*u.
    expected = torch.tensor([2.0 - 0.1 - 0.1, -2.0 - 0.1, 2.0 + 0.1, -2.0 + 0.1 + 0.1], dtype=F64)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)


def test_lamb_trust_ratio_sets_the_step_length_per_tensor():
    """One step moves each tensor by exactly lr*||p|| (the direction is r/||r||), and a zero tensor by lr*||r||."""
    starts, grads = _starts(), _grads()
    starts[1] = torch.zeros(4, dtype=F64)
    got = _run(lambda ps: Lamb(ps, lr=0.01, weight_decay=0.0, always_adapt=True), starts, grads[:1])[0]
    torch.testing.assert_close(torch.linalg.vector_norm(got[0] - starts[0]),
                               0.01 * torch.linalg.vector_norm(starts[0]), rtol=1e-12, atol=0.0)
    g = grads[0][1]  # first step r = m_hat/(sqrt(v_hat)+eps) = g/(|g| + eps) and the trust ratio falls back to 1
    torch.testing.assert_close(got[1], -0.01 * g / (g.abs() + 1e-6), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("always_adapt", [False, True])
def test_lamb_adapts_only_where_weight_decay_applies_unless_always_adapt(always_adapt):
    hp0 = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, always_adapt=always_adapt)
    hp1 = dict(lr=0.03, weight_decay=0.0)  # kiln's no_decay group
    starts, grads = _starts(), _grads()
    got = _run(_two_groups(Lamb, hp0, hp1), starts, grads)
    _assert_matches(got, _per_tensor(ref_lamb, starts, grads, [hp0, {**hp0, **hp1}]))


def test_lamb_moves_zero_initialised_biases_like_adam():
    """A zero bias in the no_decay group: with the trust ratio it starts from ||p|| = 0 and crawls (norm 0.005
    after 500 steps at lr 1e-3); timm's/apex's default leaves it the plain Adam step (norm 0.92 here)."""
    g = torch.Generator().manual_seed(4)
    grads = [[torch.randn(6, 4, generator=g, dtype=F64), 0.5 + torch.randn(16, generator=g, dtype=F64)]
             for _ in range(500)]
    starts = [torch.randn(6, 4, generator=g, dtype=F64), torch.zeros(16, dtype=F64)]

    def run(**kw):
        params = [torch.nn.Parameter(s.clone()) for s in starts]
        opt = Lamb([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-3,
                   weight_decay=0.01, **kw)
        return stepped(opt, params, grads)[-1][1]

    adam = ref_adamw(starts[1], [gs[1] for gs in grads], lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                     weight_decay=0.0)[-1]
    torch.testing.assert_close(run(), adam, rtol=1e-10, atol=1e-12)
    assert torch.linalg.vector_norm(adam) > 0.5
    assert torch.linalg.vector_norm(run(always_adapt=True)) < 0.1  # the old behaviour, now an option


# -- the AdamW factory behind conf/optimizer/adamw.yaml -------------------------------------------------------
def test_adamw_factory_keeps_torch_adamw_unless_a_cautious_option_is_on():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert type(adamw(p, lr=1e-3, foreach=None)) is torch.optim.AdamW
    assert type(adamw(p, lr=1e-3, cautious=True)) is AdamW
    assert type(adamw(p, lr=1e-3, cautious_wd=True)) is AdamW


def test_our_adamw_without_options_follows_torch_adamw():
    starts, grads = _starts(), _grads()
    kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = _run(_two_groups(AdamW, kw, dict(lr=0.03, weight_decay=0.0)), starts, grads)
    torch_ = _run(_two_groups(torch.optim.AdamW, kw, dict(lr=0.03, weight_decay=0.0)), starts, grads)
    _assert_matches(ours, torch_)


def test_adamw_yaml_builds_torch_adamw_by_default_and_ours_with_cautious():
    from hydra.utils import instantiate

    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(3))]}]  # noqa: E731
    cfg = compose_cfg("optimizer=adamw")
    assert type(instantiate(cfg.optimizer)(groups())) is torch.optim.AdamW
    cfg = compose_cfg("optimizer=adamw", "optimizer.cautious=true", "regularize.weight_decay=0.05")
    opt = instantiate(cfg.optimizer)(groups())
    assert type(opt) is AdamW and opt.param_groups[0]["cautious"] and opt.param_groups[0]["weight_decay"] == 0.05


def test_adamw_factory_passes_every_torch_keyword_through():
    p = [torch.nn.Parameter(torch.zeros(3))]
    flags = dict(amsgrad=True, maximize=True, foreach=False, capturable=True, differentiable=True)
    opt = adamw(p, lr=1e-3, **flags)
    assert type(opt) is torch.optim.AdamW and all(opt.defaults[k] == v for k, v in flags.items())
    opt = adamw(p, lr=1e-3, fused=True)  # torch has a fused AdamW on CPU too
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    with pytest.raises(TypeError):  # a keyword torch does not know is still an error
        adamw(p, lr=1e-3, fussed=True)


def test_gpu_recipe_with_fused_adamw_builds_torch_adamw():
    """recipes/char_transformer_gpu.yaml sets optimizer.fused=true (it failed with an unexpected keyword)."""
    from hydra.utils import instantiate

    cfg = compose_cfg("recipe=char_transformer_gpu")
    opt = instantiate(cfg.optimizer)([{"params": [torch.nn.Parameter(torch.zeros(3))]}])
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.99)


@pytest.mark.parametrize("option", ["cautious", "cautious_wd"])
def test_adamw_factory_with_cautious_rejects_torch_only_flags_by_name(option):
    p = [torch.nn.Parameter(torch.zeros(3))]
    for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=rf"{option}=True .*does not support {flag}=True"):
            adamw(p, lr=1e-3, **{option: True, flag: True})
    with pytest.raises(ValueError, match="amsgrad=True, maximize=True"):
        adamw(p, lr=1e-3, amsgrad=True, maximize=True, **{option: True})
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):  # any other torch keyword
        adamw(p, lr=1e-3, decoupled_weight_decay=False, **{option: True})
    # fused is ignored (no fused kernel for the cautious rule); foreach picks our path; the off values are fine.
    opt = adamw(p, lr=1e-3, fused=True, amsgrad=False, maximize=False, capturable=False, differentiable=False,
                **{option: True})
    assert type(opt) is AdamW and opt.param_groups[0][option] and opt.per_tensor is None
    assert adamw(p, foreach=False, **{option: True}).per_tensor is True
    assert adamw(p, foreach=True, **{option: True}).per_tensor is False


def test_adamw_yaml_with_fused_and_cautious_builds_ours():
    from hydra.utils import instantiate

    cfg = compose_cfg("recipe=char_transformer_gpu", "optimizer.cautious=true")
    opt = instantiate(cfg.optimizer)([{"params": [torch.nn.Parameter(torch.zeros(3))]}])
    assert type(opt) is AdamW and opt.param_groups[0]["cautious"]


# -- the per-tensor (CPU) and foreach paths of optim/adam_core.py -----------------------------------------------
ALL_OPTIONS = {
    "adamw": (AdamW, dict(lr=0.1, weight_decay=0.1)),
    "lion": (Lion, dict(lr=0.01, weight_decay=0.1)),
    "lamb": (Lamb, dict(lr=0.1, weight_decay=0.1)),
    "adam_atan2": (AdamAtan2, dict(lr=0.1, weight_decay=0.1, a=2.0, b=0.5)),
    "adam_softplus": (AdamSoftplus, dict(lr=0.1, weight_decay=0.1, softplus_beta=10.0, threshold=2.0)),
    "adams": (AdamS, dict(lr=0.1, weight_decay=0.1)),
    "diffgrad": (DiffGrad, dict(lr=0.1, weight_decay=0.1)),
    "adamomentum": (AdaMomentum, dict(lr=0.1, weight_decay=0.1)),
    "adanorm": (AdaNorm, dict(lr=0.1, weight_decay=0.1, gamma=0.5)),
}


def _mixed_shapes() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Tensors of growing and shrinking sizes (the per-tensor scratch is a view of one buffer, resized per tensor),
    with gradients whose sizes change between steps (AdaNorm's correction, cautious sign flips)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3,), (5, 7), (2,), (4, 3, 2), (1,)]
    starts = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=F64) * scale for s in shapes] for scale in (1.0, 0.3, 1e-3, 2.0)]
    return starts, grads


@pytest.mark.parametrize("caution", CAUTION, ids=["plain", "cautious", "cautious_wd", "both"])
@pytest.mark.parametrize("name", list(ALL_OPTIONS))
def test_per_tensor_and_foreach_paths_agree(name, caution):
    cls, hp = ALL_OPTIONS[name]
    starts, grads = _mixed_shapes()

    def make(per_tensor):
        def build(params):
            opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.03, "weight_decay": 0.0}],
                      **hp, **caution)
            opt.per_tensor = per_tensor
            return opt
        return build

    per_tensor, foreach, default = (_run(make(flag), starts, grads) for flag in (True, False, None))
    _assert_matches(per_tensor, foreach)
    assert all(torch.equal(a, b) for step_a, step_b in zip(default, per_tensor) for a, b in zip(step_a, step_b))


def test_a_step_leaves_no_view_of_its_scratch_in_the_state():
    """The per-tensor scratch is reused across tensors: nothing kept between steps may alias it."""
    starts, grads = _mixed_shapes()
    for name, (cls, hp) in ALL_OPTIONS.items():
        params = [torch.nn.Parameter(s.clone()) for s in starts]
        opt = cls(params, **hp, cautious=True, cautious_wd=True)
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        opt.step()
        storages = [t.untyped_storage().data_ptr() for st in opt.state.values() for t in st.values()
                    if isinstance(t, torch.Tensor)]
        assert len(storages) == len(set(storages)), name


# -- convergence, state_dict, hyperparameter checks, closure --------------------------------------------------
# name -> (make, quadratic (start, steps, tol), Rosenbrock (start, steps, tol))
CONVERGE = {
    "adamw": (lambda p: AdamW(p, lr=0.02, weight_decay=0.0), ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-8)),
    "adamw_cautious": (lambda p: AdamW(p, lr=0.02, weight_decay=0.0, cautious=True),
                       ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-6)),
    "lion": (lambda p: Lion(p, lr=0.002), ([0.0] * 8, 1000, 1e-12), ([-1.0, 1.0], 3000, 1e-2)),
    # The trust ratio makes every step lr*||p|| long, so LAMB stalls near p = 0: start away from the origin and
    # allow the floor that a constant lr leaves.
    "lamb": (lambda p: Lamb(p, lr=0.001, weight_decay=0.0, always_adapt=True), ([0.5] * 8, 1500, 1e-3),
             ([0.5, 1.5], 1000, 1e-2)),
    "adam_atan2": (lambda p: AdamAtan2(p, lr=0.05), ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-2)),
    "adam_atan2_cautious": (lambda p: AdamAtan2(p, lr=0.05, cautious=True),
                            ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-4)),
    "adam_softplus": (lambda p: AdamSoftplus(p, lr=0.02), ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-8)),
    "adams": (lambda p: AdamS(p, lr=0.02, weight_decay=0.0), ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-8)),
    "diffgrad": (lambda p: DiffGrad(p, lr=0.02), ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-8)),
    "adamomentum": (lambda p: AdaMomentum(p, lr=0.005), ([0.0] * 8, 1000, 1e-12), ([-1.0, 1.0], 3000, 1e-8)),
    "adanorm": (lambda p: AdaNorm(p, lr=0.02), ([0.0] * 8, 500, 1e-12), ([-1.0, 1.0], 2000, 1e-8)),
}


@pytest.mark.parametrize("name", list(CONVERGE))
def test_converges_on_quadratic_and_rosenbrock(name):
    make, (q_start, q_steps, q_tol), (r_start, r_steps, r_tol) = CONVERGE[name]
    assert_converges(make, quadratic, q_start, q_steps, q_tol)
    assert_converges(make, rosenbrock, r_start, r_steps, r_tol)


LOCKSTEP = {
    "adamw": lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1, cautious=True, cautious_wd=True),
    "lion": lambda ps: Lion(ps, lr=0.001, weight_decay=0.1, cautious=True, cautious_wd=True),
    "lamb": lambda ps: Lamb(ps, lr=0.01, weight_decay=0.1, cautious=True, cautious_wd=True),
    "adam_atan2": lambda ps: AdamAtan2(ps, lr=0.01, weight_decay=0.1, cautious=True, cautious_wd=True),
    "adam_softplus": lambda ps: AdamSoftplus(ps, lr=0.01, weight_decay=0.1),
    "adams": lambda ps: AdamS(ps, lr=0.01, weight_decay=0.1),
    "diffgrad": lambda ps: DiffGrad(ps, lr=0.01, weight_decay=0.1),
    "adamomentum": lambda ps: AdaMomentum(ps, lr=0.01, weight_decay=0.1),
    "adanorm": lambda ps: AdaNorm(ps, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(LOCKSTEP))
def test_state_dict_lockstep(name):
    assert_state_dict_lockstep(LOCKSTEP[name])


CLASSES = [AdamW, Lion, Lamb, AdamAtan2, AdamSoftplus, AdamS, DiffGrad, AdaMomentum, AdaNorm]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Invalid lr: -1.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta1: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta2: -0.1"),
    (dict(weight_decay=-0.5), "Invalid weight_decay: -0.5"),
])
def test_bad_hyperparameters_are_rejected_by_name(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls, kwargs, message", [
    (AdamW, dict(eps=-1e-8), "Invalid eps: -1e-08"),
    (AdamAtan2, dict(a=0.0), "Invalid a: 0.0"),
    (AdamAtan2, dict(b=-1.0), "Invalid b: -1.0"),
    (AdamSoftplus, dict(softplus_beta=0.0), "Invalid softplus_beta: 0.0"),
    (AdaNorm, dict(gamma=1.0), "Invalid gamma: 1.0"),
])
def test_bad_specific_hyperparameters_are_rejected_by_name(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_returns_the_closure_loss_and_skips_params_without_grad(cls):
    used, unused = torch.nn.Parameter(torch.ones(3, dtype=F64)), torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = cls([used, unused], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 3.0
    assert not torch.equal(used.detach(), torch.ones(3, dtype=F64))
    assert torch.equal(unused.detach(), torch.ones(2, dtype=F64)) and unused not in opt.state


def test_lamb_with_clip_norm_clips_the_global_norm_as_timm_and_apex():
    """conf/optimizer/lamb.yaml: `clip=norm` matches timm's/apex's max_grad_norm=1.0, which divides every gradient
    by max(||g||_global / 1.0, 1) before the moments (timm optim/lamb.py). torch's clip_grad_norm_ adds 1e-6 to
    the norm (as apex does), hence the tolerance."""
    from hydra.utils import instantiate

    clip = instantiate(compose_cfg("optimizer=lamb", "clip=norm").clip.norm)
    starts, grads = _starts(), _grads(scales=(30.0, 0.1, 20.0))  # global norms above and below 1
    hp = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    opt, got = Lamb(params, **hp), []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        clip(params)
        opt.step()
        got.append([p.detach().clone() for p in params])
    clipped = [[g / max(torch.sqrt(sum((x * x).sum() for x in gs)).item(), 1.0) for g in gs] for gs in grads]
    want = _per_tensor(ref_lamb, starts, clipped, [hp, hp])
    for g_step, w_step in zip(got, want):
        for g, w in zip(g_step, w_step):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(got[-1][0], _per_tensor(ref_lamb, starts, grads, [hp, hp])[-1][0], rtol=1e-3)
