"""The loop's promises: accumulation equals the large batch, resume is bit-exact, early stopping restores."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose_cfg
from trainer.checkpoint import load_checkpoint
from trainer.run import run


def vae_cfg(root, *overrides):
    return compose_cfg(f"data.root={root}", "trainer.progress=off", "trainer.pictures=false",
                       "trainer.histogram_interval=0", *overrides)


def params(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def logged(run_dir, key="train/loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_grad_accumulation_4x32_equals_one_batch_of_128(mnist_root, tmp_path):
    # SGD with momentum: the update is linear in the gradient, so float rounding (~1e-8) stays ~1e-8. Adam's
    # m/sqrt(v) turns rounding noise on near-zero gradients (MNIST's blank border pixels) into +-lr steps,
    # so with Adam the two runs agree only to ~2e-6.
    common = ("optimizer=momentum", "optimizer.lr=0.001", "schedule=cosine_warmup", "trainer.max_steps=12",
              "task.batch_size=128", "trainer.log_interval=3", "regularize.weight_decay=0.1")
    run(vae_cfg(mnist_root, *common, "trainer.grad_accum=1"), tmp_path / "big")
    run(vae_cfg(mnist_root, *common, "trainer.grad_accum=4"), tmp_path / "acc")
    big, acc = params(tmp_path / "big"), params(tmp_path / "acc")
    assert big.keys() == acc.keys()
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=0, atol=1e-6, msg=k)
    moved = sum((big[k] - load_init(mnist_root)[k]).abs().sum() for k in big)
    assert moved > 0  # the comparison is not between two untrained models
    for step, loss in logged(tmp_path / "big").items():
        assert logged(tmp_path / "acc")[step] == pytest.approx(loss, rel=1e-5)


def load_init(root):
    from trainer.build import build

    return build(vae_cfg(root)).model.state_dict()


@pytest.mark.parametrize("extra", [(), ("clip=norm", "regularize.dropout=0.2", "amp=bf16")])
def test_resume_is_bit_exact(mnist_root, tmp_path, extra):
    """N steps straight == K steps, then a new process state resumed from the step-K checkpoint, N-K more."""
    common = ("trainer.max_steps=30", "trainer.log_interval=4", "trainer.checkpoint_interval=10",
              "trainer.keep_checkpoints=0", "trainer.eval_interval=10", *extra)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(vae_cfg(mnist_root, *common), straight)
    ckpt = straight / "checkpoints" / "step-00000010.pt"
    run(vae_cfg(mnist_root, *common, f"trainer.resume={ckpt}"), resumed)

    a, b = params(straight), params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses_a, losses_b = logged(straight), logged(resumed)
    assert min(losses_b) == 12 and max(losses_b) == 28  # the resumed run logged only its own steps
    assert {s: losses_a[s] for s in losses_b} == losses_b  # exactly equal floats
    assert logged(straight, "eval/val_loss")[30] == logged(resumed, "eval/val_loss")[30]


def test_resume_from_a_run_directory_takes_the_newest_checkpoint(mnist_root, tmp_path):
    run(vae_cfg(mnist_root, "trainer.max_steps=6", "trainer.checkpoint_interval=2"), tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*")) == \
        ["step-00000004.pt", "step-00000006.pt"]  # keep_checkpoints=2
    final = run(vae_cfg(mnist_root, "trainer.max_steps=8", f"trainer.resume={tmp_path / 'a'}"), tmp_path / "b")
    assert final["step"] == 8
    assert sorted(logged(tmp_path / "b")) == [] or min(logged(tmp_path / "b")) > 6


def line_cfg(*overrides):
    cfg = compose_cfg("optimizer=sgd", "optimizer.lr=0.05", "schedule=constant", "early_stop=on",
                      "monitor.metric=distance", "early_stop.monitor=distance", "early_stop.patience=2",
                      "trainer.max_steps=100", "trainer.eval_interval=1", "trainer.log_interval=1",
                      "trainer.progress=off", "trainer.histogram_interval=0", *overrides)
    cfg.task = {"_target_": "tests.toy.LineTask", "target": 10.0, "sweet_spot": 3.0, "batch_size": 4}
    return cfg


def test_early_stopping_stops_and_restores_the_best_weights(tmp_path):
    final = run(line_cfg(), tmp_path)
    # w_t = 10 * (1 - 0.9^t): closest to 3 at t = 3 (w = 2.71) vs t = 4 (3.439); two worse evals then stop.
    w = [10 * (1 - 0.9**t) for t in range(10)]
    best_t = min(range(10), key=lambda t: abs(w[t] - 3))
    assert best_t == 3
    assert final["step"] == best_t + 2 and final["restored_best_step"] == best_t
    assert "has not improved" in final["stop_reason"]
    assert final["distance"] == pytest.approx(abs(w[best_t] - 3), rel=1e-6)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == best_t and best["model"]["w"].item() == pytest.approx(w[best_t], rel=1e-6)
    # The last checkpoint holds where training actually ended, not the restored weights.
    assert params(tmp_path)["w"].item() == pytest.approx(w[best_t + 2], rel=1e-6)


def test_early_stopping_min_delta_and_max_mode(tmp_path):
    from torch import nn

    from regularize.early_stop import EarlyStopping

    model = nn.Linear(1, 1)
    es = EarlyStopping(monitor="acc", mode="max", patience=2, min_delta=0.01)
    assert not es.update({"acc": 0.5}, 1, model)
    assert not es.update({"acc": 0.505}, 2, model)  # within min_delta: not an improvement
    assert es.update({"acc": 0.509}, 3, model)
    assert es.best == 0.5 and es.best_step == 1
    with pytest.raises(KeyError, match="not an eval metric"):
        EarlyStopping(monitor="nope").update({"acc": 1.0}, 1, model)


def test_trainer_threads_are_set_only_when_they_change_the_count(mnist_root, monkeypatch):
    """Setting torch's thread count, even to the count it already uses, made the char-GPT's steps ~5% slower on
    a 2-core AMD EPYC (bench/peer.py): trainer.threads equal to the current count leaves torch alone."""
    from trainer.build import build

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    current = torch.get_num_threads()
    build(vae_cfg(mnist_root, f"trainer.threads={current}"))
    assert calls == []
    build(vae_cfg(mnist_root, f"trainer.threads={current + 1}"))
    assert calls == [current + 1]
