"""Reduce on plateau: hand-worked traces of observe(), torch's ReduceLROnPlateau as an oracle, warmup,
pickling, and the Scheduler: each evaluation counted once for all param groups, state saved and restored."""

from __future__ import annotations

import io
import pickle
import random

import pytest
import torch

from schedules import Horizon, Plateau, Scheduler, plateau

H = Horizon(total_steps=100, steps_per_epoch=10)


def trace(p: Plateau, values: list[float], key: str = "test_loss") -> list[float]:
    out = []
    for v in values:
        p.observe({key: v, "other": -1.0})
        out.append(p(50))
    return out


def test_min_rel_with_patience_cooldown_and_min_multiplier():
    p = plateau(H, mode="min", factor=0.5, patience=1, threshold=0.1, threshold_mode="rel", cooldown=1,
                min_multiplier=0.2)
    # best 10 -> an improvement must go below 10 - 0.1*10 = 9; then best 8 -> below 7.2
    values = [10, 9.5, 9.2, 9.3, 9.4, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert trace(p, values) == [1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]
    assert p.best == 8.0


def test_max_abs_patience_zero():
    p = plateau(H, monitor="accuracy", mode="max", factor=0.1, patience=0, threshold=0.5,
                threshold_mode="abs")
    # 0.9 is not above 0.5 + 0.5; 1.2 is; 1.5 is not above 1.2 + 0.5
    assert trace(p, [0.5, 0.9, 1.2, 1.5], key="accuracy") == pytest.approx([1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("mode, threshold_mode, patience, cooldown", [
    ("min", "rel", 2, 0), ("min", "abs", 1, 2), ("max", "rel", 0, 1), ("max", "abs", 3, 0),
])
def test_same_decisions_as_torch_reduce_lr_on_plateau(mode, threshold_mode, patience, cooldown):
    rng = random.Random(0)
    values = [1.0 + rng.random() * (1 + i % 7) / (1 + i) for i in range(60)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=patience,
                                                     threshold=0.05, threshold_mode=threshold_mode,
                                                     cooldown=cooldown, min_lr=0.01)
    ours = plateau(H, mode=mode, factor=0.5, patience=patience, threshold=0.05, threshold_mode=threshold_mode,
                   cooldown=cooldown, min_multiplier=0.01)
    expected = []
    for v in values:
        ref.step(v)
        expected.append(opt.param_groups[0]["lr"])
    got = trace(ours, values)
    assert got == pytest.approx(expected, rel=1e-12)
    assert min(got) < 1.0  # the sequence does trigger reductions


def test_warmup_scales_the_current_multiplier():
    p = plateau(H, warmup=4, patience=0, factor=0.5)
    assert [p(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    p.observe({"test_loss": 1.0})
    p.observe({"test_loss": 1.0})
    assert [p(t) for t in (0, 3, 4, 99, 1000)] == [0.125, 0.5, 0.5, 0.5, 0.5]


def test_monitor_key_errors_and_eval_prefix():
    p = plateau(H, monitor="eval/test_loss", patience=0)
    p.observe({"test_loss": 1.0})
    p.observe({"test_loss": 1.0})
    assert p(10) == 0.5
    with pytest.raises(KeyError, match="schedule.monitor='missing'.*test_loss"):
        plateau(H, monitor="missing").observe({"test_loss": 1.0})


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "mid"}, "schedule.mode='mid'"),
    ({"threshold_mode": "pct"}, "schedule.threshold_mode='pct'"),
    ({"factor": 1.0}, "schedule.factor=1.0"),
    ({"patience": -1}, "schedule.patience=-1"),
    ({"cooldown": 1.5}, "schedule.cooldown=1.5"),
    ({"min_multiplier": 2}, "schedule.min_multiplier=2"),
    ({"warmup": "x"}, "schedule.warmup='x'"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plateau(H, **kwargs)


def test_state_is_plain_data_and_pickles():
    p = plateau(H, patience=0)
    p.observe({"test_loss": 2.0})
    p.observe({"test_loss": 3.0})
    assert all(isinstance(v, int | float | str) for v in vars(p).values())
    q = pickle.loads(pickle.dumps(p))
    assert vars(q) == vars(p) and q(7) == 0.5


def _opt() -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.03}]
    return torch.optim.SGD(groups, lr=0.1)


def _observe(sched, value: float) -> None:
    """What trainer/loop.py does after each evaluation."""
    sched.observe({"test_loss": value})


def test_each_group_counts_an_evaluation_once():
    opt = _opt()
    sched = Scheduler(plateau(H, patience=2, factor=0.5), opt)
    for i in range(4):
        _observe(sched, 1.0)  # 1 improvement, then bad evaluations 1, 2, 3
        opt.step()
        sched.step(i + 1)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([0.1, 0.03] if i < 3 else [0.05, 0.015]), i


def _run(steps: range, sched, opt, metrics: list[float]) -> list[list[float]]:
    lrs = []
    for s in steps:
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step(s + 1)
        if (s + 1) % 5 == 0:
            _observe(sched, metrics[s // 5])
    return lrs


def test_resume_through_the_scheduler_state_dict_equals_an_uninterrupted_run():
    # evaluations every 5 steps; the loss stalls at 2 (reductions before step 20) and at 1 (after it)
    metrics = [3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    make = lambda: plateau(H, patience=1, factor=0.5, warmup=3)  # noqa: E731
    opt = _opt()
    sched = Scheduler(make(), opt)
    full = _run(range(40), sched, opt, metrics)

    opt = _opt()
    sched = Scheduler(make(), opt)
    first = _run(range(20), sched, opt, metrics)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain data only

    opt2 = _opt()
    sched2 = Scheduler(make(), opt2)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    rest = _run(range(20, 40), sched2, opt2, metrics)
    assert first + rest == full
    assert full[0] == pytest.approx([0.1 / 3, 0.01])  # warmup, ratio 0.3 kept
    # the evaluation after update 19 reduces the LR: the new LR applies from the very next update, 20
    assert full[19] == pytest.approx([0.1, 0.03]) and full[20] == pytest.approx([0.05, 0.015])
    assert full[39] == pytest.approx([0.025, 0.0075])

    # control: the same continuation without loading the schedule's state gives other LRs
    opt3 = _opt()
    sched3 = Scheduler(make(), opt3)
    opt3.load_state_dict(state["opt"])
    sched3.step(20)
    assert _run(range(20, 40), sched3, opt3, metrics) != rest


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_evaluations_to_act_is_when_the_lr_first_falls(patience):
    """What the config checker's oddity counts on: without improvement, the first fall is at that evaluation."""
    p = plateau(H, patience=patience)
    falls = trace(p, [1.0] * 10).index(0.5) + 1
    assert plateau.evaluations_to_act(patience) == falls
