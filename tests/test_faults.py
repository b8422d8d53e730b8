"""Faults lose nothing: non-finite steps, SIGTERM at random points, corrupt checkpoints, resume=auto, DDP."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from core.sampler import EpochSampler
from tests.conftest import ROOT, compose_cfg, run_cli
from tests.test_loop import line_cfg, params
from trainer.checkpoint import CheckpointDir, load_checkpoint
from trainer.loop import Trainer
from trainer.nonfinite import NonFiniteError
from trainer.run import run


def poisoned_step(seed: int = 0, index: int = 5, size: int = 64, batch: int = 4) -> int:
    """The first step whose batch holds sample `index` (the sampler's order is a function of the seed)."""
    sampler = EpochSampler(size, batch, seed, torch.device("cpu"))
    return next(t for t in range(size // batch) if index in sampler.indices(t).tolist())


def poisoned_cfg(*overrides, poison=(5,)):
    cfg = line_cfg("optimizer=momentum", "optimizer.lr=0.01", *overrides)
    cfg.task.poison = list(poison)
    cfg.early_stop = None
    return cfg


def test_nonfinite_raise_names_the_step(tmp_path):
    bad = poisoned_step()
    with pytest.raises(NonFiniteError, match=f"non-finite training loss at step {bad}"):
        run(poisoned_cfg("trainer.nonfinite=raise", "trainer.max_steps=16", "trainer.log_interval=4",
                         "trainer.eval_interval=0"), tmp_path)
    assert not (tmp_path / "final_metrics.json").exists()


def test_nonfinite_skip_leaves_parameters_and_optimizer_state_untouched(tmp_path):
    bad = poisoned_step()
    common = ("trainer.nonfinite=skip", "trainer.eval_interval=0", "trainer.log_interval=1")
    run(poisoned_cfg(*common, f"trainer.max_steps={bad}"), tmp_path / "before")
    final = run(poisoned_cfg(*common, f"trainer.max_steps={bad + 1}"), tmp_path / "skipped")
    assert final["skipped_nonfinite"] == 1
    a = load_checkpoint(tmp_path / "before" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "skipped" / "checkpoints" / "last.pt")
    assert torch.equal(a["model"]["w"], b["model"]["w"])
    assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"], b["optimizer"]["state"][0]["momentum_buffer"])
    # and training goes on past it
    final = run(poisoned_cfg(*common, "trainer.max_steps=32"), tmp_path / "on")
    assert final["step"] == 32 and final["skipped_nonfinite"] == 2  # once per epoch of 16 steps


def test_too_many_nonfinite_in_a_row_stops_with_a_message(tmp_path):
    final = run(poisoned_cfg("trainer.nonfinite=skip", "trainer.max_nonfinite=3", "trainer.eval_interval=0",
                             poison=range(64)), tmp_path)
    assert final["step"] == 3 and "3 non-finite steps in a row" in final["stop_reason"]


def cnn_args(data_root, run_dir, *extra):
    return ["recipe=mnist_cnn", f"data.root={data_root}", "task.val_size=1000", "task.batch_size=64",
            "trainer.max_steps=80", "trainer.log_interval=1", "trainer.eval_interval=20",
            "trainer.checkpoint_interval=0",
            "trainer.histogram_interval=0", "trainer.pictures=false", "early_stop.patience=1000", "schedule.warmup=5",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_sigterm_at_ten_random_points_then_resume_equals_the_uninterrupted_run(mnist_root, tmp_path):
    """Kill a training subprocess with SIGTERM at 10 random steps, resuming after each; the final parameters
    (CNN with BatchNorm, dropout and per-sample augmentation: every RNG matters) equal a run never stopped."""
    rng = random.Random(1234)
    targets = sorted(rng.sample(range(3, 70), 10))
    run_dir = tmp_path / "interrupted"
    kills, resume_from = [], None
    for target in targets:
        if resume_from is not None and target <= resume_from:
            target = resume_from + 1
        extra = [f"trainer.resume={run_dir}"] if resume_from is not None else []
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cnn_args(mnist_root, run_dir, *extra)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for line in proc.stdout:
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= target:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 143, err[-2000:]
        assert "stopped by SIGTERM" in err and f"trainer.resume={run_dir}" in err
        resume_from = CheckpointDir(run_dir / "checkpoints").step_files()[-1]
        resume_from = int(resume_from.stem.split("-")[1])
        kills.append(resume_from)
    assert len(kills) == 10 and kills == sorted(kills) and kills[-1] < 80
    out = run_cli(*cnn_args(mnist_root, run_dir, f"trainer.resume={run_dir}"))
    assert out.returncode == 0, out.stderr[-2000:]

    straight = tmp_path / "straight"
    out = run_cli(*cnn_args(mnist_root, straight))
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = params(straight), params(run_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(1, 81))  # one row per step


@pytest.mark.parametrize("leave_out", ["rng", "data position"])
def test_negative_control_resume_fails_without_rng_or_data_position(mnist_root, tmp_path, monkeypatch, leave_out):
    common = ("trainer.max_steps=20", "trainer.checkpoint_interval=10", "trainer.keep_checkpoints=0",
              "trainer.eval_interval=0", "regularize.dropout=0.2")
    vae = lambda *o: compose_cfg(f"data.root={mnist_root}", "trainer.progress=off", "trainer.pictures=false",  # noqa
                                 "trainer.histogram_interval=0", *common, *o)
    run(vae(), tmp_path / "straight")
    original = Trainer.load_state_dict

    def forgetful(self, state, *args):
        if leave_out == "rng":
            rng = {"python": state["rng"]["python"], "numpy": state["rng"]["numpy"],
                   "torch": torch.random.default_generator.get_state()}
            state = {**state, "rng": rng, "rng_ranks": [rng]}
        original(self, state, *args)
        if leave_out == "data position":
            sampler = self.p.sampler
            base = sampler.indices
            sampler.indices = lambda step: base(step - state["step"])  # the data order restarts

    monkeypatch.setattr(Trainer, "load_state_dict", forgetful)
    ckpt = tmp_path / "straight" / "checkpoints" / "step-00000010.pt"
    run(vae(f"trainer.resume={ckpt}"), tmp_path / "resumed")
    a, b = params(tmp_path / "straight"), params(tmp_path / "resumed")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(mnist_root, tmp_path, capsys):
    common = (f"data.root={mnist_root}", "trainer.progress=off", "trainer.pictures=false",
              "trainer.histogram_interval=0", "trainer.eval_interval=0", "trainer.checkpoint_interval=4",
              "trainer.log_interval=1")
    run(compose_cfg(*common, "trainer.max_steps=8"), tmp_path / "a")
    newest = tmp_path / "a" / "checkpoints" / "step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk outside our atomic write
    final = run(compose_cfg(*common, "trainer.max_steps=10", f"trainer.resume={tmp_path / 'a'}"), tmp_path / "b")
    assert final["step"] == 10
    assert "step-00000008.pt could not be read" in capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in rows if "train/loss" in r) == 5  # resumed from step 4


@pytest.mark.slow
def test_resume_auto_continues_the_newest_run_with_the_same_config(mnist_root, tmp_path):
    runs = tmp_path / "runs"
    args = (f"data.root={mnist_root}", "trainer.max_steps=6", "trainer.checkpoint_interval=3",
            "trainer.eval_interval=0",
            "trainer.pictures=false", "trainer.resume=auto")
    first = run_cli(*args, f"hydra.run.dir={runs}/first")
    assert first.returncode == 0
    other = run_cli(*args, "optimizer.lr=0.002", f"hydra.run.dir={runs}/other")  # a different config
    assert other.returncode == 0
    again = run_cli(*args, "trainer.max_steps=9", f"hydra.run.dir={runs}/again")
    assert again.returncode == 0  # max_steps differs: a different config, so a fresh run
    assert (runs / "again" / "final_metrics.json").is_file()
    cont = run_cli(*args, f"hydra.run.dir={runs}/third")
    assert cont.returncode == 0, cont.stderr[-2000:]
    assert not (runs / "third").exists()  # it continued in the first run's directory
    assert "resumed from" in cont.stdout and str(runs / "first") in cont.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(mnist_root, tmp_path):
    args = [f"data.root={mnist_root}", "task=mnist_cnn", "norm=none", "regularize.dropout=0", "optimizer=momentum",
            "optimizer.lr=0.05", "schedule=constant", "task.batch_size=64", "task.val_size=1000",
            "trainer.max_steps=6", "trainer.eval_interval=3", "trainer.log_interval=2", "trainer.pictures=false",
            "trainer.histogram_interval=0", "trainer.threads=1"]
    single = run_cli(*args, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "train.py"), *args, "trainer.strategy=ddp",
                          f"hydra.run.dir={tmp_path / 'ddp'}"], capture_output=True, text=True, timeout=600, env=env,
                         cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = params(tmp_path / "single"), params(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    losses = lambda d: [json.loads(r)["train/loss"] for r in (d / "metrics.jsonl").read_text().splitlines()  # noqa
                        if "train/loss" in r]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert ddp.stdout.count("final metrics") == 1  # only rank 0 prints


def inf_grad_cfg(*overrides, inf_grad=(5,), times=None):
    """The line task with SGD momentum; samples in `inf_grad` get a finite loss whose gradient is infinite (for
    the first `times` batches that hold one, or always)."""
    cfg = line_cfg("optimizer=momentum", "optimizer.lr=0.01", "trainer.eval_interval=0", *overrides)
    cfg.task.inf_grad = list(inf_grad)
    cfg.task.inf_grad_times = times
    cfg.early_stop = None
    return cfg


# -- no checkpoint holds non-finite weights; no run ends with a non-finite metric and exit 0 ------------------
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_an_update_that_makes_the_weights_nonfinite_stops_before_the_checkpoint(tmp_path, mode):
    # SGD from w = 0 on (w - 10)^2: w_1 = 20 * lr, infinite in float32 for lr = 1e38 although the loss was finite
    cfg = inf_grad_cfg("optimizer=sgd", "optimizer.lr=1e38", "trainer.max_steps=1", f"trainer.nonfinite={mode}",
                       inf_grad=())
    with pytest.raises(NonFiniteError, match="parameters are not finite after step 1"):
        run(cfg, tmp_path)
    assert not (tmp_path / "final_metrics.json").exists()
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def test_diverged_sgd_on_the_vae_exits_nonzero(mnist_root, tmp_path):
    out = run_cli(f"data.root={mnist_root}", "optimizer=sgd", "optimizer.lr=1e37", "trainer.max_steps=1",
                  "trainer.pictures=false", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0  # the weights are huge but finite; the forward pass overflows
    assert "final metric val_loss is nan (val_loss=nan, test_loss=nan)" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "final_metrics.json").exists()


def test_a_nonfinite_final_metric_is_an_error(tmp_path, monkeypatch):
    from tests.toy import LineTask

    monkeypatch.setattr(LineTask, "evaluate", lambda self, model: {"distance": float("nan")})
    with pytest.raises(NonFiniteError, match="final metric distance is nan"):
        run(inf_grad_cfg("trainer.max_steps=4", inf_grad=()), tmp_path)
    assert not (tmp_path / "final_metrics.json").exists()


@pytest.mark.slow
def test_ddp_resume_restores_every_ranks_own_rng(mnist_root, tmp_path):
    """Dropout draws differ per rank; after a resume each rank must continue its own stream, so 2 ranks resumed at
    step 3 end exactly where 2 ranks run straight end (today every rank got rank 0's RNG state back)."""
    args = [f"data.root={mnist_root}", "regularize.dropout=0.3", "optimizer=momentum", "optimizer.lr=0.01",
            "schedule=constant", "task.batch_size=64", "trainer.eval_interval=0", "trainer.log_interval=1",
            "trainer.checkpoint_interval=3", "trainer.keep_checkpoints=0", "trainer.pictures=false",
            "trainer.histogram_interval=0", "trainer.threads=1", "trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={free_port()}", str(ROOT / "train.py"), *args, *extra],
                             capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]

    torchrun("trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'straight'}")
    ckpt = tmp_path / "straight" / "checkpoints" / "step-00000003.pt"
    assert len(load_checkpoint(ckpt)["rng_ranks"]) == 2
    torchrun("trainer.max_steps=6", f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}")
    a, b = params(tmp_path / "straight"), params(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("average", ["none", "ema"])
def test_sigkill_at_ten_random_moments_resumes_from_the_newest_intact_checkpoint(mnist_root, tmp_path, average):
    """SIGKILL (no handler runs, no checkpoint is written on the way out) at 10 random moments, three of them in the
    middle of a checkpoint write (a temporary file is on disk when the kill lands). After each kill the same
    command (trainer.resume=auto) continues from the newest intact checkpoint; the run ends bit-equal to one never
    killed, with exactly one metrics.jsonl row per logged step (rows past the resumed checkpoint are dropped). With
    average=ema, the average (evaluated every 20 steps) ends bit-equal too."""
    rng = random.Random(2024)
    run_dir = tmp_path / "killed"
    common = ("trainer.checkpoint_interval=4", "trainer.max_steps=100", "task.batch_size=32", "trainer.threads=1",
              f"average={average}")
    args = cnn_args(mnist_root, run_dir, "trainer.resume=auto", *common)
    ckpts = CheckpointDir(run_dir / "checkpoints")
    mid_write = set(rng.sample(range(10), 3))
    kills, attempts = [], 0
    while len(kills) < 10:
        attempts += 1
        assert attempts < 30
        done = ckpts.step_files()
        start = int(done[-1].stem.split("-")[1]) if done else 0
        target = rng.randint(start + 1, start + 7)
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        caught_mid_write = False
        for line in proc.stdout:
            if not (line.startswith("step ") and int(line.split()[1].split("/")[0]) >= target):
                continue
            if len(kills) in mid_write:  # wait for the next checkpoint write to begin, then kill inside it
                newest = ckpts.step_files()[-1] if ckpts.step_files() else None
                while proc.poll() is None:
                    if any(p.name.endswith(".tmp") for p in ckpts.root.iterdir()):
                        proc.kill()
                        caught_mid_write = True
                        break
                    if (ckpts.step_files() or [None])[-1] != newest:  # a write began and ended unseen
                        break
            else:
                time.sleep(rng.uniform(0, 0.05))  # somewhere inside a step
            break
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=300)
        if proc.returncode != -signal.SIGKILL or (len(kills) in mid_write and not caught_mid_write):
            continue  # it finished first, or the write ended before the kill: this attempt does not count
        if caught_mid_write:
            assert any(p.name.endswith(".tmp") for p in ckpts.root.iterdir())
        kills.append((target, caught_mid_write))
    assert sum(mid for _, mid in kills) == 3
    out = run_cli(*args, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # debris cleared

    straight = tmp_path / "straight"
    out = run_cli(*cnn_args(mnist_root, straight, *common), timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = params(straight), params(run_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if average == "ema":
        a, b = (load_checkpoint(d / "checkpoints" / "average.pt")["model"] for d in (straight, run_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["average"]["count"] == 100
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(1, 101))
    keys = [(r["step"], k) for r in rows for k in r if k != "step"]
    assert len(keys) == len(set(keys))  # no value logged twice for one step
    reference = [json.loads(r) for r in (straight / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["train/loss"] for r in rows if "train/loss" in r} == \
        {r["step"]: r["train/loss"] for r in reference if "train/loss" in r}
