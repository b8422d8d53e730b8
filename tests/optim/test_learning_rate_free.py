"""Prodigy (prodigyopt) and D-Adaptation Adam (dadaptation), the authors' packages, as conf/optimizer builds them:
the step-size estimate `d` in every param group, its growth from d0, convergence, state_dict round trip, and
Prodigy's first steps against the paper's Adam version (arXiv 2306.06101)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_cfg
from tests.optim.harness import assert_converges, assert_state_dict_lockstep, quadratic

OPTIONS = ["prodigy", "dadapt_adam"]


def make(option: str, **overrides):
    cfg = compose_cfg(f"optimizer={option}", "regularize.weight_decay=0.0")
    factory = instantiate(cfg.optimizer)
    return lambda params: factory(params, **overrides)


@pytest.mark.parametrize("option", OPTIONS)
def test_the_estimate_d_is_in_every_group_and_grows_from_d0(option):
    a, b = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))  # the minimum is at 1
    opt = make(option)([{"params": [a]}, {"params": [b], "weight_decay": 0.0}])
    assert [g["d"] for g in opt.param_groups] == [1e-6, 1e-6]
    for _ in range(10):
        opt.zero_grad()
        (quadratic(a.view(-1)) + quadratic(b)).backward()
        opt.step()
    d = {g["d"] for g in opt.param_groups}
    assert len(d) == 1 and d.pop() > 1e-4  # one estimate shared by all groups, grown by orders of magnitude


@pytest.mark.parametrize("option", OPTIONS)
def test_converges_without_a_learning_rate(option):
    assert_converges(make(option), quadratic, [3.0, -2.0, 0.5, 4.0], steps=400, tol=1e-2)


@pytest.mark.parametrize("option", OPTIONS)
def test_state_dict_round_trip_continues_exactly(option):
    assert_state_dict_lockstep(make(option))


def test_prodigy_first_steps_follow_the_paper():
    """Prodigy's Adam version (Mishchenko & Defazio, ICML 2024; lr = 1, bias correction off, beta3 = sqrt(beta2),
    the (1 - beta3) factors of r and s dropped since they cancel in r/||s||_1):
    m = b1 m + (1-b1) d_k g;  v = b2 v + (1-b2) d_k^2 g^2;  r = b3 r + d_k^2 <g, x0 - x>;  s = b3 s + d_k^2 g;
    d_{k+1} = max(d_k, r / ||s||_1);  x -= d_k m / (sqrt(v) + d_k eps).
    The package scales r and s by 1/d0 (a common factor of the ratio)."""
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    gs = [torch.tensor(g, dtype=torch.float64) for g in ([0.3, -0.1, 0.2], [0.5, 0.2, -0.4], [-0.1, 0.6, 0.3])]
    b1, b2 = 0.9, 0.999
    b3 = math.sqrt(b2)
    x, m, v, r, s, d = x0.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), \
        0.0, torch.zeros(3, dtype=torch.float64), 1e-6
    want = []
    for g in gs:
        m = b1 * m + (1 - b1) * d * g
        v = b2 * v + (1 - b2) * d**2 * g**2
        r = b3 * r + d**2 * torch.dot(g, x0 - x).item()
        s = b3 * s + d**2 * g
        x = x - d * m / (v.sqrt() + d * 1e-8)
        d = max(d, r / s.abs().sum().item())
        want.append(x.clone())

    p = torch.nn.Parameter(x0.clone())
    opt = make("prodigy")([p])
    for g, w in zip(gs, want):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("option", OPTIONS)
def test_the_trainer_logs_the_estimated_step_size_beside_the_learning_rate(option, mnist_root, tmp_path):
    """d_lr/<group> = d x lr of the update just logged: at step 1 that is d0 (1e-6, the YAML's) times the logged lr;
    later d has grown, so d_lr / lr does too."""
    import json

    from trainer.run import run

    cfg = compose_cfg(f"optimizer={option}", f"data.root={mnist_root}", "trainer.device=cpu", "trainer.max_steps=6",
                      "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.checkpoint_interval=0",
                      "trainer.histogram_interval=0", "trainer.pictures=false", "trainer.progress=off",
                      "task.batch_size=32", "schedule=constant")
    run(cfg, tmp_path)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"lr/' in r]
    groups = [k.removeprefix("lr/") for k in rows[0] if k.startswith("lr/")]
    assert groups and all(f"d_lr/{g}" in rows[0] for g in groups)
    first, last = rows[0], rows[-1]
    assert [first["step"], last["step"]] == [1, 6]
    for g in groups:
        assert first[f"d_lr/{g}"] == pytest.approx(cfg.optimizer.d0 * first[f"lr/{g}"], rel=1e-12)
        assert last[f"d_lr/{g}"] / last[f"lr/{g}"] > 10 * cfg.optimizer.d0
