"""Ctrl-C and SIGTERM end a run at any phase with the interrupted exit code and the command that resumes it:
start-up, training, the final phase (last evaluation, test metrics, last checkpoint, pictures) and a second signal;
never a traceback, never an exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from experiments.sweep import Ledger
from tests.conftest import ROOT, run_cli
from tests.experiments.test_compare import CONF, run_main
from tests.test_loop import line_cfg
from tests.toy import LineTask
from trainer.checkpoint import CheckpointDir, load_checkpoint
from trainer.run import run
from trainer.signals import Interrupted

TOY = [f"hydra.searchpath=[file://{CONF}]", "task=compare_toy", "task._target_=tests.signal_toy.SelfSignalling",
       "trainer.max_steps=6", "trainer.eval_interval=3", "trainer.log_interval=1", "trainer.progress=off"]


def final_phase_cfg(*overrides):
    cfg = line_cfg("trainer.max_steps=4", "trainer.eval_interval=0", "trainer.checkpoint_interval=0", *overrides)
    cfg.early_stop = None
    return cfg


def signal_in(monkeypatch, obj, name, signum=signal.SIGINT, when=lambda *a: True):
    """Make obj.name send `signum` to this process (once, when `when(*args)`), then do what it did."""
    original = getattr(obj, name, None)
    sent = []

    def wrapped(*args, **kwargs):
        if not sent and when(*args):
            sent.append(True)
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs) if original else None

    monkeypatch.setattr(obj, name, wrapped, raising=False)


def _test_metrics(self, model):
    return {"test_distance": abs(model.w.item() - self.sweet_spot)}


@pytest.mark.parametrize(("phase", "signum"), [("final evaluation", signal.SIGINT), ("test metrics", signal.SIGTERM),
                                               ("last checkpoint", signal.SIGINT), ("pictures", signal.SIGTERM)])
def test_a_signal_in_the_final_phase_stops_the_run_and_the_resume_finishes_it(phase, signum, tmp_path, monkeypatch):
    monkeypatch.setattr(LineTask, "final_metrics", _test_metrics, raising=False)
    monkeypatch.setattr(LineTask, "save_pictures", lambda self, model, folder: folder.mkdir(exist_ok=True),
                        raising=False)
    expected = run(final_phase_cfg("trainer.pictures=true"), tmp_path / "straight")
    if phase == "final evaluation":
        # the last evaluation, not the protocol's check of the initial model (w starts at 0)
        signal_in(monkeypatch, LineTask, "evaluate", signum, when=lambda task, model: model.w.item() != 0.0)
    elif phase == "test metrics":
        signal_in(monkeypatch, LineTask, "final_metrics", signum)
    elif phase == "last checkpoint":
        signal_in(monkeypatch, CheckpointDir, "save", signum, when=lambda ckpt, state, step: step == 4)
    else:
        signal_in(monkeypatch, LineTask, "save_pictures", signum)
    run_dir = tmp_path / "stopped"
    with pytest.raises(Interrupted) as stopped:
        run(final_phase_cfg("trainer.pictures=true"), run_dir)
    message = str(stopped.value)
    assert stopped.value.exit_code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} at step 4" in message
    assert f"trainer.resume={run_dir}" in message
    assert (run_dir / "checkpoints" / "step-00000004.pt").is_file()  # the last checkpoint is the last step's
    if phase == "final evaluation":
        assert "training is complete" not in message
    else:
        assert "training is complete" in message
    assert (run_dir / "final_metrics.json").is_file() == (phase == "pictures")
    resumed = run(final_phase_cfg("trainer.pictures=true", f"trainer.resume={run_dir}"), run_dir)
    assert {k: v for k, v in resumed.items() if "time" not in k} == \
        {k: v for k, v in expected.items() if "time" not in k}
    assert (run_dir / "pictures").is_dir()


def _train(*args, timeout=240):
    return run_cli(*TOY, *args, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


def signal_at(tmp_path, phase, name="SIGINT"):
    """The override that makes tests.signal_toy.SelfSignalling send `name` at `phase` (once)."""
    return f"+task.signal_at={phase}:{name}:{tmp_path / 'signalled'}"


def test_train_py_interrupted_in_its_final_phase_exits_130_with_the_resume_command(tmp_path):
    out = _train(f"hydra.run.dir={tmp_path / 'run'}", signal_at(tmp_path, "final"))
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stderr
    assert "stopped by SIGINT at step 6" in out.stderr and "training is complete" in out.stderr
    assert f"trainer.resume={tmp_path / 'run'}" in out.stderr
    assert not (tmp_path / "run" / "final_metrics.json").exists()


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    out = _train(f"hydra.run.dir={tmp_path / 'run'}", "trainer.checkpoint_interval=3", signal_at(tmp_path, "step5"))
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "stopped at once by a second SIGINT" in out.stderr
    assert "step-00000003.pt" in out.stderr and f"trainer.resume={tmp_path / 'run'}" in out.stderr


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_one_line(name, tmp_path):
    out = _train(f"hydra.run.dir={tmp_path / 'run'}", signal_at(tmp_path, "setup", name))
    assert out.returncode == 128 + getattr(signal, name), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"stopped by {name} before training began" in out.stderr


@pytest.mark.parametrize("command", ["train.py", "compare"])
def test_ctrl_c_while_python_imports_torch_is_one_line(command, tmp_path):
    """SIGINT as soon as train.py or compare imports torch (python -X importtime reports imports as they end)."""
    args = ([str(ROOT / "train.py"), *TOY, f"hydra.run.dir={tmp_path / 'run'}"] if command == "train.py" else
            ["-m", "experiments.compare", *compare_args(tmp_path, 1)])
    proc = subprocess.Popen([sys.executable, "-X", "importtime", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "torch" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "Traceback" not in rest and ("stopped by SIGINT during start-up" in rest if command == "train.py" else
                                        "experiments.compare: stopped by SIGINT" in rest), rest


def test_wall_time_counts_every_session(tmp_path):
    """wall_time_s is the run's total over its sessions (saved in the checkpoint), not the last session's."""
    first = run(final_phase_cfg("trainer.max_steps=2"), tmp_path)
    saved = load_checkpoint(tmp_path / "checkpoints" / "step-00000002.pt")["loop"]["wall_time"]
    final = run(final_phase_cfg("trainer.max_steps=4", f"trainer.resume={tmp_path}"), tmp_path)
    assert 0 < saved <= first["wall_time_s"]
    assert final["wall_time_s"] == pytest.approx(saved + final["session_wall_time_s"], abs=0.02)
    saved_at_4 = load_checkpoint(tmp_path / "checkpoints" / "step-00000004.pt")["loop"]["wall_time"]
    assert saved < saved_at_4 <= final["wall_time_s"]
    again = run(final_phase_cfg("trainer.max_steps=4", f"trainer.resume={tmp_path}"), tmp_path)  # finished: resumed
    assert again["wall_time_s"] == pytest.approx(saved_at_4 + again["session_wall_time_s"], abs=0.02)


def _wait_for(path, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# -- compare -------------------------------------------------------------------------------------------------------
def compare_args(tmp_path, jobs, *overrides):
    return ["optimizer=sgd,adam", *TOY[:3], "trainer.max_steps=6", "trainer.eval_interval=3", *overrides, "--screen",
            "--seeds", "2", "--jobs", str(jobs), "--out", str(tmp_path / "cmp")]


def ctrl_c_when(marker):
    """Ctrl-C to this process (compare) once `marker` appears (a trial waits in its final phase); `thread.sent` is
    when."""
    def send():
        _wait_for(marker)
        thread.sent = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_between_a_trials_claim_and_its_run_records_it_interrupted(tmp_path, monkeypatch):
    """A Ctrl-C in the moment after a trial claimed its directory (a "running" line in the ledger) and before its run
    took the signals over: the trial is recorded as interrupted, never left running."""
    import experiments.sweep

    def ctrl_c(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments.sweep, "_set_aside_previous_attempt", ctrl_c)
    stopped = run_main(compare_args(tmp_path, 1))
    assert stopped.code == 130 and "Traceback" not in stopped.err, stopped.err
    entries = Ledger(tmp_path / "cmp" / "trials").entries()
    assert [e["status"] for e in entries.values()] == ["interrupted"]


@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: worker processes start
def test_ctrl_c_while_a_trial_is_in_its_final_phase_stops_compare_at_once(jobs, tmp_path):
    args = compare_args(tmp_path, jobs, signal_at(tmp_path, "wait_final"))
    thread = ctrl_c_when(tmp_path / "signalled.waiting")
    stopped = run_main(args)
    took = time.monotonic() - thread.sent
    assert stopped.code == 130 and "Traceback" not in stopped.err, stopped.err
    assert took < 60  # the trials stop at once: no waiting for a worker that never answers (120 s)
    entries = Ledger(tmp_path / "cmp" / "trials").entries()
    finished = [e for e in entries.values() if e["status"] == "finished"]
    assert "running" not in {e["status"] for e in entries.values()}
    assert sum(e["status"] == "interrupted" for e in entries.values()) >= 1
    if jobs == 1:
        assert len(entries) == 1  # no other trial started after the Ctrl-C
    assert f"interrupted. {len(finished)} trials are finished" in " ".join(stopped.err.split())
    again = run_main(args)
    assert again.code == 0, again.err
    assert f"{4 - len(finished)} trials run, {len(finished)} read from the ledger" in again.out


@pytest.mark.slow
def test_a_worker_that_dies_is_reported_as_what_it_was_and_the_comparison_resumes(tmp_path):
    args = compare_args(tmp_path, 2, signal_at(tmp_path, "kill4", "SIGKILL"))
    died = run_main(args)
    err = " ".join(died.err.split())
    assert died.code == 1 and "Traceback" not in err, err
    assert "interrupted." not in err
    assert "killed by SIGKILL" in err and "out of memory" in err
    assert "Continue with the same command" in err
    ledger = Ledger(tmp_path / "cmp" / "trials")
    killed = [e for e in ledger.entries().values() if "worker process died" in (e.get("error") or "")]
    assert len(killed) == 1 and "killed by SIGKILL" in killed[0]["error"] and killed[0]["run_dir"] in err
    again = run_main(args)
    assert again.code == 0, again.err
    assert all(e["status"] == "finished" for e in ledger.entries().values()) and len(ledger.entries()) == 4
