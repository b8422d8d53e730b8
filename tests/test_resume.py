"""A run directory belongs to one run, and a resume is checked against the run it continues (issue 11, items 3, 5,
6, 9): the checkpoint's stored config is compared with the resuming one, legitimate changes are applied (the
schedule included) and recorded, changes that break exactness are refused, and early stopping's decision survives.
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from core.errors import ConfigError, UserError
from tests.test_loop import line_cfg, params, vae_cfg
from trainer.checkpoint import load_checkpoint
from trainer.loop import Trainer
from trainer.run import run
from trainer.signals import Interrupted


def toy(*overrides, **task):
    cfg = line_cfg("trainer.eval_interval=0", *overrides)
    cfg.early_stop = {}  # early_stop=off
    cfg.task.update(task)
    return cfg


def rows(run_dir):
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(run_dir, key="train/loss"):
    return {r["step"]: r[key] for r in rows(run_dir) if key in r}


def interrupt_at(monkeypatch, step: int) -> None:
    """SIGTERM arrives while step `step` runs (as trainer.run.stop_on_signals would record it)."""
    original = Trainer._forward_backward

    def forward_backward(self, indices):
        if self.step == step - 1:
            self.signal = signal.SIGTERM
        return original(self, indices)

    monkeypatch.setattr(Trainer, "_forward_backward", forward_backward)


# -- item 3: a reused run directory -------------------------------------------------------------------------------
def test_resume_auto_in_its_own_directory_continues_instead_of_restarting(tmp_path, monkeypatch):
    cfg = toy("trainer.max_steps=8", "trainer.checkpoint_interval=2", "trainer.resume=auto")
    run_dir = tmp_path / "runs" / "x"  # alone in its parent: resume=auto has no sibling to pick instead
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(Interrupted):
            run(cfg, run_dir)
    final = run(cfg, run_dir)  # the same command again
    assert final["step"] == 8
    steps = [r["step"] for r in rows(run_dir) if "train/loss" in r]
    assert steps == list(range(1, 9))  # continued from step 5, each step logged once
    straight = run(toy("trainer.max_steps=8", "trainer.checkpoint_interval=2"), tmp_path / "straight")
    assert final["distance"] == straight["distance"]


def test_a_fresh_run_into_a_directory_holding_another_run_is_refused(tmp_path):
    run(toy("trainer.max_steps=8"), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run") as e:
        run(toy("trainer.max_steps=4"), tmp_path)
    assert "trainer.resume=" in str(e.value) and "hydra.run.dir" in str(e.value)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing mixed in
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 8


def test_move_aside_keeps_the_old_run_and_starts_clean(tmp_path, capsys):
    run(toy("trainer.max_steps=8"), tmp_path)
    final = run(toy("trainer.max_steps=4", "trainer.existing_run=move_aside"), tmp_path)
    assert final["step"] == 4
    assert sorted(logged(tmp_path)) == [1, 2, 3, 4]
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-00000004.pt"]
    old = tmp_path / "previous_run_1"
    assert sorted(logged(old)) == list(range(1, 9))
    assert load_checkpoint(old / "checkpoints" / "last.pt")["step"] == 8
    assert "moved the run that was there to" in capsys.readouterr().err


# -- item 5: resume compares configs ---------------------------------------------------------------------------
def test_legitimate_changes_apply_on_resume_schedule_included(tmp_path):
    """lr and max_steps changed on resume: from the resumed step on, the LR is exactly what a run started with the
    new settings uses at that step (new base LR, new horizon), never the old schedule's."""
    common = ("schedule=cosine", "trainer.checkpoint_interval=2", "trainer.keep_checkpoints=0")
    run(toy(*common, "trainer.max_steps=4"), tmp_path / "a")
    run(toy(*common, "trainer.max_steps=8", "optimizer.lr=1e-3", f"trainer.resume={tmp_path / 'a'}"), tmp_path / "b")
    run(toy(*common, "trainer.max_steps=8", "optimizer.lr=1e-3"), tmp_path / "ref")
    lr_b, lr_ref = logged(tmp_path / "b", "train/lr"), logged(tmp_path / "ref", "train/lr")
    assert sorted(lr_b) == [5, 6, 7, 8]
    assert {s: lr_ref[s] for s in lr_b} == lr_b
    assert lr_b[5] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # step index 4 of 8
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    changes = manifest["resumes"][-1]["changes"]
    assert changes["optimizer.lr"] == [0.05, 1e-3] and changes["trainer.max_steps"] == [4, 8]
    assert manifest["resumes"][-1]["step"] == 4


def test_a_change_that_breaks_exactness_is_refused_naming_the_keys(tmp_path):
    run(toy("trainer.max_steps=4"), tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "a").rglob("*"))
    with pytest.raises(ConfigError) as e:
        run(toy("trainer.max_steps=8", "trainer.seed=3", f"trainer.resume={tmp_path / 'a'}", target=12.0),
            tmp_path / "b")
    message = str(e.value)
    assert "trainer.seed: 0 -> 3" in message and "task.target: 10.0 -> 12.0" in message
    assert "trainer.max_steps" not in message  # a legitimate change is not listed as a problem
    assert "trainer.resume_allow_changes=true" in message
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == before
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_an_optimizer_of_another_type_is_a_clear_error_and_can_be_accepted(tmp_path, capsys):
    run(toy("trainer.max_steps=4", "optimizer=adamw"), tmp_path / "a")
    with pytest.raises(ConfigError, match="optimizer._target_"):
        run(toy("trainer.max_steps=8", "optimizer=momentum", f"trainer.resume={tmp_path / 'a'}"), tmp_path / "b")
    final = run(toy("trainer.max_steps=8", "optimizer=momentum", f"trainer.resume={tmp_path / 'a'}",
                    "trainer.resume_allow_changes=true"), tmp_path / "c")
    assert final["step"] == 8
    assert "fresh optimizer state" in capsys.readouterr().err


def test_a_checkpoint_of_another_task_is_a_clear_error(tmp_path):
    run(toy("trainer.max_steps=4"), tmp_path / "a")
    cfg = toy("trainer.max_steps=8", f"trainer.resume={tmp_path / 'a'}")
    cfg.task._target_ = "tests.toy.ShiftedLineTask"
    with pytest.raises(UserError, match="another task") as e:
        run(cfg, tmp_path / "b")
    assert "tests.toy.LineTask" in str(e.value) and "tests.toy.ShiftedLineTask" in str(e.value)


# -- item 6: early stopping survives resume --------------------------------------------------------------------
def test_an_early_stopped_run_resumed_stays_stopped(tmp_path):
    first = run(line_cfg(), tmp_path / "a")  # stops at step 5 (see test_loop)
    assert first["step"] == 5 and "has not improved" in first["stop_reason"]
    again = run(line_cfg(f"trainer.resume={tmp_path / 'a'}"), tmp_path / "b")
    assert again["step"] == 5 and again["stop_reason"] == first["stop_reason"]
    assert again["distance"] == first["distance"] and again["restored_best_step"] == 3


# -- item 9: the final evaluation runs once; samples/s and train time leave evaluation out ---------------------
def test_the_final_evaluation_runs_once(tmp_path, monkeypatch):
    from tests.toy import LineTask

    calls = []
    original = LineTask.evaluate
    monkeypatch.setattr(LineTask, "evaluate", lambda self, model: calls.append(1) or original(self, model))
    run(toy("trainer.max_steps=8", "trainer.eval_interval=4"), tmp_path)
    # the protocol check before training (a task outside kiln's tasks/), steps 4 and 8; the final metrics reuse step 8's
    assert len(calls) == 3


def test_training_time_and_samples_per_second_exclude_evaluation(tmp_path, monkeypatch):
    import time

    from tests.toy import LineTask

    original = LineTask.evaluate

    def slow_evaluate(self, model):
        time.sleep(0.25)
        return original(self, model)

    monkeypatch.setattr(LineTask, "evaluate", slow_evaluate)
    final = run(toy("trainer.max_steps=40", "trainer.eval_interval=4", "trainer.log_interval=4"), tmp_path)
    assert final["wall_time_s"] >= 2.5  # ten evaluations of 0.25 s
    assert final["train_time_s"] < 1.0
    evals = [r for r in rows(tmp_path) if "eval/distance" in r]
    assert [r["step"] for r in evals] == list(range(4, 41, 4))
    assert all(a["time/train_s"] <= b["time/train_s"] for a, b in zip(evals, evals[1:]))
    assert evals[-1]["time/train_s"] <= final["train_time_s"]
    # 4 steps x 4 samples per interval: with evaluation left out, far above the 16 / 0.25 s it would read
    assert min(logged(tmp_path, "train/samples_per_s").values()) > 16 / 0.25


# -- a resume on other data; a truncated checkpoint recovered ------------------------------------------------------
def test_a_resume_on_other_data_is_refused_naming_what_changed_or_accepted_on_purpose(tmp_path, monkeypatch):
    """The task's data fingerprint (the default: the training set's size) is in every checkpoint; a resume whose
    data differ is refused like a config change, unless trainer.resume_allow_data_changes=true."""
    from tests.toy import LineTask

    run(toy("trainer.max_steps=4"), tmp_path / "a")
    monkeypatch.setattr(LineTask, "train_size", property(lambda self: 80))  # the data grew; the config did not
    with pytest.raises(ConfigError) as e:
        run(toy("trainer.max_steps=8", f"trainer.resume={tmp_path / 'a'}"), tmp_path / "b")
    message = str(e.value)
    assert message.startswith(f"trainer.resume={tmp_path / 'a'}: the checkpoint was written on other data")
    assert "\n  train_size: 64 -> 80\n" in message and "trainer.resume_allow_data_changes=true" in message
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    final = run(toy("trainer.max_steps=8", f"trainer.resume={tmp_path / 'a'}",
                    "trainer.resume_allow_data_changes=true"), tmp_path / "c")
    assert final["step"] == 8
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["resumes"][-1]["changes"] == {"data:train_size": [64, 80], "trainer.max_steps": [4, 8]}


def test_a_truncated_newest_checkpoint_is_a_warning_and_the_run_goes_on(tmp_path, capsys):
    common = ("trainer.checkpoint_interval=2", "trainer.keep_checkpoints=0")
    run(toy(*common, "trainer.max_steps=8"), tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    final = run(toy(*common, "trainer.max_steps=10", f"trainer.resume={tmp_path}"), tmp_path)
    assert final["step"] == 10 and sorted(logged(tmp_path)) == list(range(1, 11))
    err = capsys.readouterr().err
    assert not any(line.startswith("error") for line in err.splitlines())
    assert err.startswith(f"warning: checkpoint {newest} could not be read (")
    assert "Resuming from the previous one, step-00000006.pt (step 6)" in err


def test_a_checkpoint_of_an_earlier_kiln_is_refused_with_the_reason(tmp_path):
    """A checkpoint written before kiln's own scheduler holds torch LambdaLR's state: the resume stops with one
    paragraph that says why and what to do, not a KeyError."""
    cfg = toy("trainer.max_steps=2", "trainer.checkpoint_interval=2")
    run(cfg, tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000002.pt"

    state = torch.load(ckpt, weights_only=False)
    state["scheduler"] = {"base_lrs": [0.1], "last_epoch": 2, "_step_count": 3, "_last_lr": [0.1], "lr_lambdas": [None]}
    torch.save(state, ckpt)
    with pytest.raises(UserError, match=r"written by an earlier kiln \(its schedule state is torch's LambdaLR\)"):
        run(toy("trainer.max_steps=4", "trainer.checkpoint_interval=2", f"trainer.resume={ckpt}"), tmp_path / "b")


# -- the learning-rate-free and matrix-preconditioned optimizers resume exactly (their running group entries kept) ---


@pytest.mark.parametrize("optimizer", ["prodigy", "dadapt_adam", "soap", "shampoo"])
def test_learning_rate_free_and_preconditioned_optimizers_resume_bit_exact(mnist_root, tmp_path, optimizer):
    """6 steps straight == 3 steps, then resumed from the step-3 checkpoint (Prodigy's and D-Adaptation's d and
    their running sums live in the param groups, SOAP's bases and Shampoo's factors in the state)."""
    common = (f"optimizer={optimizer}", "trainer.max_steps=6", "trainer.log_interval=1",
              "trainer.checkpoint_interval=3", "trainer.keep_checkpoints=0", "trainer.eval_interval=0",
              "optimizer.precondition_frequency=2" if optimizer == "soap" else "trainer.seed=0")
    straight, resumed = straight_then_resumed(mnist_root, tmp_path, common, at=3)
    assert {s: v for s, v in logged(straight).items() if s > 3} == logged(resumed)


def straight_then_resumed(mnist_root, tmp_path, common, at):
    """The VAE run `common` straight, and again resumed from its step-`at` checkpoint: the final weights are equal
    bit for bit. Returns both run directories."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(vae_cfg(mnist_root, *common), straight)
    run(vae_cfg(mnist_root, *common, f"trainer.resume={straight / 'checkpoints' / f'step-{at:08d}.pt'}"), resumed)
    a, b = params(straight), params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return straight, resumed


# -- weight averaging (average=ema|swa|lawa): the average and its counters live in every checkpoint ---------------
def same(a, b, where="") -> None:
    """Nested checkpoint contents equal, every tensor bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def resumed_equals_straight(cfg, tmp_path, every=10):
    """Run `cfg` straight and resumed from its step-`every` checkpoint; both must agree bit for bit: weights, the
    average's state, every logged loss and evaluation, the final metrics and the averaged weights written at the end."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    final_a = run(cfg(), straight)
    run(cfg(f"trainer.resume={straight / 'checkpoints' / f'step-{every:08d}.pt'}"), resumed)
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (straight, resumed))
    same(a["model"], b["model"], "model")
    same(a["average"], b["average"], "average")
    same(load_checkpoint(straight / "checkpoints" / "average.pt")["model"],
         load_checkpoint(resumed / "checkpoints" / "average.pt")["model"], "average.pt")
    values = lambda d: {(r["step"], k): v for r in rows(d) for k, v in r.items()  # noqa: E731
                        if k != "step" and "_per_s" not in k and "time" not in k}
    logged_b = values(resumed)
    assert logged_b and {key: v for key, v in values(straight).items() if key[0] > every} == logged_b
    final_b = json.loads((resumed / "final_metrics.json").read_text())
    untimed = lambda f: {k: v for k, v in f.items() if "time" not in k}  # noqa: E731
    assert untimed(final_a) == untimed(final_b)
    return final_a, a


AVERAGES = {"ema": ("average=ema",), "swa": ("average=swa", "average.start=5", "average.every=3"),
            "lawa": ("average=lawa", "average.k=3", "average.every=4")}


@pytest.mark.parametrize("average", AVERAGES)
def test_resume_with_weight_averaging_is_bit_exact(mnist_root, tmp_path, average):
    from tests.test_loop import vae_cfg

    cfg = lambda *o: vae_cfg(mnist_root, "trainer.max_steps=30", "trainer.log_interval=5",  # noqa: E731
                             "trainer.checkpoint_interval=10", "trainer.keep_checkpoints=0", "trainer.eval_interval=10",
                             "average.eval=both", *AVERAGES[average], *o)
    final, last = resumed_equals_straight(cfg, tmp_path)
    assert final["val_loss"] != final["raw_val_loss"]  # the average is what was evaluated, not the last weights
    assert last["average"]["count"] == {"ema": 30, "swa": 9, "lawa": 7}[average]  # updates, snapshots


def test_resume_with_swa_and_batchnorm_recomputed_through_a_dataloader_is_bit_exact(digit_folder, tmp_path):
    """BatchNorm statistics of the average recomputed (update_bn over the first steps' batches, 2 loader workers,
    random crops, dropout) at every evaluation: the recompute moves neither the training RNG nor the data order."""
    from tests.test_batches import digits_cfg

    cfg = lambda *o: digits_cfg(digit_folder, "trainer.max_steps=20", "trainer.checkpoint_interval=10",  # noqa: E731
                                "trainer.keep_checkpoints=0", "trainer.eval_interval=5", "trainer.log_interval=1",
                                "data.workers=2", "regularize.dropout=0.2", "average=swa", "average.start=2",
                                "average.every=2", "average.bn_steps=3", *o)
    final, last = resumed_equals_straight(cfg, tmp_path)
    assert last["average"]["count"] == 10
    bn = [k for k in last["model"] if k.endswith("running_mean")]
    assert bn  # the tiny CNN has BatchNorm
    averaged = load_checkpoint(tmp_path / "straight" / "checkpoints" / "average.pt")["model"]
    assert not any(torch.equal(averaged[k], last["model"][k]) for k in bn)  # recomputed, not the trained model's


def test_weight_averaging_may_change_on_resume(tmp_path):
    """Averaging never changes training, so it may be added or changed on resume: an average of another kind
    starts at the resumed step; the trained weights continue exactly."""
    common = ("trainer.checkpoint_interval=4", "trainer.keep_checkpoints=0")
    run(toy(*common, "trainer.max_steps=8"), tmp_path / "a")
    run(toy(*common, "trainer.max_steps=12", "average=ema", f"trainer.resume={tmp_path / 'a'}"), tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["average"]["count"] == 4  # steps 9..12
    final = run(toy(*common, "trainer.max_steps=16", "average=lawa", "average.every=2", "average.k=8",
                    f"trainer.resume={tmp_path / 'b'}"), tmp_path / "c")
    last = load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")
    assert last["average"]["count"] == 2  # steps 14 and 16: a fresh ring, not EMA's state
    straight = run(toy(*common, "trainer.max_steps=16"), tmp_path / "straight")
    trained = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]["w"]
    assert torch.equal(last["model"]["w"], trained)
    assert final["distance"] != straight["distance"]  # evaluated on the average
