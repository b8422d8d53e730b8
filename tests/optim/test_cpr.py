"""AdamCPR (optim/cpr.py): Adam + the Lagrange-multiplier constraint by hand, both kappa initialisations, and
that the constraint ||p||^2 <= kappa is what training ends at when the unconstrained optimum violates it.

The inflection-point references are written from the authors' implementation (pytorch_cpr/adamcpr.py in
github.com/automl/CPR, `_multi_tensor_adamcpr`), not from optim/cpr.py: R is sampled when the step is a multiple
of reg_step_size, its "EMA" is (1 - reg_ema_decay)*R (the code rebinds the EMA to a fresh tensor, so it never
accumulates), the rise is compared from step 3*reg_step_size on, and kappa is set to R at the first sample whose
rise is below the previous one.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from optim.cpr import CPR
from optim.param_groups import param_groups
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
    minimise,
    quadratic,
    rosenbrock,
)


class AuthorsInflectionPoint:
    """Kappa-IP as the authors' foreach path runs it, one tensor, host floats (reg_ema_decay 0.9 as theirs)."""

    def __init__(self, reg_step: int, reg_ema_decay: float = 0.9) -> None:
        self.s, self.decay = reg_step, reg_ema_decay
        self.prev_reg = self.prev_reg_gradient = 0.0
        self.kappa: float | None = None

    def observe(self, step: int, reg: float) -> None:
        """R after the Adam step of `step` (1-based)."""
        if self.kappa is not None or step % self.s:
            return
        ema = self.decay * 0.0 + (1 - self.decay) * reg  # their state EMA stays 0: the new value is rebound
        if step > self.s:
            current = ema - self.prev_reg
            if step > 3 * self.s and self.prev_reg_gradient > current:
                self.kappa = reg
            self.prev_reg = ema
            if step > 2 * self.s:
                self.prev_reg_gradient = current


def ref_cpr(p, grads, lr, kappa, mu=1.0, b1=0.9, b2=0.999, eps=1e-8, constrained=True, reg_step=None):
    """Adam (no decay), then with R = ||p||^2: lam = max(0, lam + mu/numel*(R - kappa)); p -= 2*lam*p
    (the paper's Algorithm 1). kappa=None: inflection point (AuthorsInflectionPoint) sampled every reg_step
    steps; until it fires there is no constraint. Returns the params and kappas after each step."""
    out, kappas, m, v, lam = [], [], torch.zeros_like(p), torch.zeros_like(p), 0.0
    detector = AuthorsInflectionPoint(reg_step) if kappa is None else None
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        if constrained:
            reg = p.pow(2).sum().item()
            if detector is not None:
                detector.observe(t, reg)
                kappa = detector.kappa
            if kappa is not None:
                lam = max(0.0, lam + mu / p.numel() * (reg - kappa))
                p = p - 2 * lam * p
        out.append(p)
        kappas.append(kappa)
    return out, kappas


def test_first_three_steps_match_the_rule_with_uniform_kappa():
    # Group 0: the matrix, constrained to ||p||^2 <= 5 (it starts at 8.125); group 1: weight_decay=0, i.e.
    # kiln's no_decay group, plain Adam.
    params = [torch.nn.Parameter(MATRIX.clone()), torch.nn.Parameter(VECTOR.clone())]
    opt = CPR([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "weight_decay": 0.0}], lr=0.05,
              kappa_init="uniform", kappa=5.0, mu=0.1)
    actual = []
    for gm, gv in zip(MATRIX_GRADS, VECTOR_GRADS):
        params[0].grad, params[1].grad = gm.clone(), gv.clone()
        opt.step()
        actual.append([p.detach().clone() for p in params])
    expected = list(zip(ref_cpr(MATRIX, MATRIX_GRADS, lr=0.1, kappa=5.0, mu=0.1)[0],
                        ref_cpr(VECTOR, VECTOR_GRADS, lr=0.05, kappa=5.0, constrained=False)[0]))
    check_against(actual, expected)
    assert opt.state[params[0]]["lagmul"].item() > 0 and opt.state[params[1]]["lagmul"].item() == 0


def s_curve(steps: int, seed: int = 0) -> list[float]:
    """R(t) = 22 / (1 + exp(-(t - 2000)/1160)) with relative noise 1e-6: inflection at t = 2000 (the case of
    issue 12, where step-by-step detection fired at t = 607 with kappa 5.09)."""
    noise = torch.randn(steps, generator=torch.Generator().manual_seed(seed), dtype=F64).tolist()
    return [22.0 / (1 + math.exp(-(t - 2000) / 1160)) * (1 + 1e-6 * noise[t - 1]) for t in range(1, steps + 1)]


def fire(opt: CPR, p: torch.nn.Parameter, regs: list[float]) -> tuple[int, float] | None:
    """Drive R(p) along `regs` (lr=0: the Adam step leaves p alone; p is reset to the next value each step)
    and return (step, kappa) when kappa gets set."""
    for t, reg in enumerate(regs, 1):
        with torch.no_grad():
            p.fill_(math.sqrt(reg / p.numel()))
        p.grad = torch.zeros_like(p)
        opt.step()
        kappa = opt.state[p]["kappa"].item()
        if not math.isinf(kappa):
            return t, kappa
    return None


def test_inflection_point_of_a_noisy_s_curve_is_found_where_the_authors_code_finds_it():
    regs = s_curve(3000)
    authors = AuthorsInflectionPoint(reg_step=200)
    for t, reg in enumerate(regs, 1):
        authors.observe(t, reg)
        if authors.kappa is not None:
            break
    assert t == 2400 and authors.kappa == pytest.approx(12.88, abs=0.01)  # the figures

    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    step, kappa = fire(CPR([p], lr=0.0, reg_step=200), p, regs)
    assert step == 2400, f"kappa set at step {step} (R = {kappa:.4g}); the authors' code sets it at 2400"
    assert kappa == pytest.approx(authors.kappa, rel=1e-12)


def test_inflection_point_sets_kappa_on_a_training_trajectory_as_the_authors_code_does():
    # A gradient that pushes the weights outwards, strongly then weakly: ||p||^2 grows fast, then slower.
    grads = [-MATRIX.sign() * (2.0 if t < 20 else 0.2) * (1 + 0.1 * t) for t in range(40)]
    lr, reg_step = 0.05, 3
    expected, kappas = ref_cpr(MATRIX, grads, lr=lr, kappa=None, reg_step=reg_step)
    first = next(t for t, k in enumerate(kappas, 1) if k is not None)
    assert first > 20 and first % reg_step == 0  # the reference fires once the growth slows, on a sample
    p = torch.nn.Parameter(MATRIX.clone())
    opt = CPR([p], lr=lr, reg_step=reg_step)
    pulled = False
    for t, (g, want, kappa) in enumerate(zip(grads, expected, kappas), 1):
        p.grad = g.clone()
        opt.step()
        pulled |= opt.state[p]["lagmul"].item() > 0
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14, msg=f"step {t}")
        got = opt.state[p]["kappa"].item()
        assert (math.isinf(got) and kappa is None) or got == pytest.approx(kappa, rel=1e-12), f"step {t}"
    assert pulled  # the constraint acted after the inflection point


def test_reg_ema_smooths_the_samples_and_fires_later():
    """reg_ema > 0 (what the authors' reg_ema_decay meant to do): the samples R_k are averaged,
    m_k = b*m_{k-1} + (1-b)*R_k, e_k = m_k/(1-b^k), and the rises of e_k are compared; worked out here on the
    S-curve, where the smoothed rise peaks later."""
    regs, s, beta = s_curve(5000), 200, 0.5
    avg = prev = prev_rise = 0.0
    want = None
    for k, t in enumerate(range(s, len(regs) + 1, s), 1):
        avg = beta * avg + (1 - beta) * regs[t - 1]
        e = avg / (1 - beta**k)
        if k >= 2:
            rise = e - prev
            if k >= 4 and rise < prev_rise:
                want = (t, regs[t - 1])
                break
            prev = e
            if k >= 3:
                prev_rise = rise
    assert want is not None and want[0] > 2400
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    step, kappa = fire(CPR([p], lr=0.0, reg_step=s, reg_ema=beta), p, regs)
    assert step == want[0] and kappa == pytest.approx(want[1], rel=1e-12)


def test_training_ends_on_the_constraint():
    """Minimum of the quadratic at p = 1 (||p||^2 = 4); with kappa = 1 the iterates settle at ||p||^2 ~ 1."""
    end = minimise(lambda ps: CPR(ps, lr=0.01, kappa_init="uniform", kappa=1.0), quadratic, [0.0] * 4, 1500)
    assert end.pow(2).sum().item() == pytest.approx(1.0, abs=0.05)
    free = minimise(lambda ps: CPR(ps, lr=0.01, kappa_init="uniform", kappa=1.0, constrain=False), quadratic,
                    [0.0] * 4, 1500)
    torch.testing.assert_close(free, torch.ones(4, dtype=F64), atol=1e-6, rtol=0)


def test_converges_when_the_bound_is_loose():
    make = lambda lr: lambda ps: CPR(ps, lr=lr, kappa_init="uniform", kappa=100.0)  # noqa: E731
    assert_converges(make(0.01), quadratic, [0.0] * 4, steps=1000, tol=1e-6)
    assert_converges(make(0.1), rosenbrock, [-1.2, 1.0], steps=1000, tol=1e-3)


@pytest.mark.parametrize("kwargs", [dict(reg_step=1), dict(reg_step=2, reg_ema=0.5),
                                    dict(kappa_init="uniform", kappa=0.5)])
def test_state_dict_lockstep(kwargs):
    assert_state_dict_lockstep(lambda ps: CPR(ps, lr=0.01, **kwargs))


@pytest.mark.parametrize("kwargs,bad", [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"kappa_init": "x"}, "Invalid kappa_init: 'x'"),
    ({"kappa": 0.0}, "Invalid kappa: 0.0"),
    ({"mu": 0.0}, "Invalid mu: 0.0"),
    ({"reg_step": 0}, "Invalid reg_step: 0"),
    ({"betas": (1.0, 0.9)}, "Invalid betas"),
])
def test_rejects_bad_hyperparameters(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        CPR([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_option_builds_it_and_leaves_the_no_decay_group_unconstrained():
    """Through the config and the trainer's param groups: the decay group (Linear weight) is constrained, the
    no_decay group (bias, LayerNorm) is plain Adam."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).double()
    opt = instantiate(compose_cfg("optimizer=cpr", "optimizer.kappa_init=uniform", "optimizer.kappa=0.01",
                                  "optimizer.lr=0.0").optimizer)(param_groups(model))
    assert isinstance(opt, CPR) and opt.defaults["reg_step"] == 200
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(5, 3, dtype=F64)).sum().backward()
    opt.step()  # lr=0: only the constraint moves parameters
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == {"0.weight"}


# -- regularize.weight_decay_mode=coupled: CPR has no weight decay to move into the loss ------------------------
COUPLED = ("optimizer=cpr", "regularize.weight_decay_mode=coupled", "regularize.weight_decay=0.1")


def test_coupled_weight_decay_with_cpr_is_a_config_error_naming_the_keys():
    """It used to zero every group's weight_decay, which switched CPR off (it skips groups with weight_decay=0),
    while no L2 was added either (no group had weight_decay > 0): training ran unregularized, silently."""
    from config import problems
    from regularize.weight_decay import coupled_weight_decay

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = instantiate(compose_cfg(*COUPLED).optimizer)(param_groups(model))
    with pytest.raises(ValueError, match=r"regularize\.weight_decay_mode=coupled .*CPR has no weight decay"):
        coupled_weight_decay(opt, "coupled", 0.1)
    assert [g.get("weight_decay") for g in opt.param_groups] == [None, 0.0]  # left as they were
    assert any(line.startswith("regularize.weight_decay_mode=coupled") and "regularize.weight_decay_mode="
               "decoupled" in line for line in problems(compose_cfg(*COUPLED)))
    # Without a weight decay to move, coupled mode has nothing to do and CPR runs as usual.
    assert coupled_weight_decay(opt, "coupled", 0.0) is None
    assert not problems(compose_cfg("optimizer=cpr", "regularize.weight_decay_mode=coupled"))


def test_coupled_weight_decay_with_cpr_exits_with_code_2_before_training(tmp_path):
    from tests.conftest import run_cli

    done = run_cli(*COUPLED, f"hydra.run.dir={tmp_path}", "trainer.max_steps=1", timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "regularize.weight_decay_mode=coupled" in done.stderr + done.stdout
