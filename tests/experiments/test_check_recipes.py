"""`python -m experiments.check_recipes`: every recipe declares its result, and the checker holds runs to it.

The slow test runs the VAE recipes' short versions (20 s each) and asserts they reach their declared targets; the
char-GPT and CNN short versions take minutes on a CPU and are run by `make check-recipes` (every recipe, the GPU
transformer's 50-step smoke version included), which a change to a recipe or the trainer must pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import validate
from experiments.check_recipes import Expectation, Result, expectation, judge_time, recipe_names, this_machine
from tests.conftest import ROOT, compose_cfg

RECIPES = recipe_names()


def check(*args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run the checker as a user would; returns the process and check.json (None if it was not written)."""
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--out=")))  # the tests give absolute paths
    proc = subprocess.run([sys.executable, "-m", "experiments.check_recipes", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    path = out / "check.json"
    return proc, json.loads(path.read_text()) if path.is_file() else None


def test_pass_rule_at_the_bounds():
    low = Expectation(metric="val_loss", mode="min", target=1.88, tolerance=0.02, device="cpu")
    assert low.bound == pytest.approx(1.90)
    assert low.passes(1.90) and low.passes(1.0) and not low.passes(1.9001)
    high = Expectation(metric="test_acc", mode="max", target=0.993, tolerance=0.0, device="any")
    assert high.passes(0.993) and high.passes(1.0) and not high.passes(0.9929)
    assert high.rule == "test_acc >= 0.993" and low.rule == "val_loss <= 1.9 (target 1.88 + 0.02)"


@pytest.mark.parametrize("status,wall,cpu,factor,after", [
    ("passed", 25.0, 25.0, 2.0, "SLOW"),      # 2.5x the declared 10 s, on the clock and in CPU seconds
    ("passed", 25.0, 15.0, 2.0, "passed"),    # a busy machine: the clock stretched, the CPU seconds did not
    ("passed", 15.0, 40.0, 2.0, "passed"),    # more threads: CPU seconds add up, the clock is fine
    ("passed", 20.0, 20.0, 2.0, "passed"),    # exactly 2x: within
    ("passed", 25.0, 25.0, 3.0, "passed"),    # a looser factor
    ("passed", 250.0, 250.0, 0.0, "passed"),  # 0: no time check
    ("FAILED", 25.0, 25.0, 2.0, "FAILED"),    # a missed target stays FAILED; the reason adds the time
])
def test_a_run_slower_than_twice_its_declaration_is_slow(status, wall, cpu, factor, after):
    exp = Expectation(metric="val_loss", mode="min", target=1.9, tolerance=0.0, device="cpu", wall_time_s=10.0,
                      measured_on="the reference machine")
    result = Result("r", "full", status, wall_s=wall, cpu_s=cpu, reason="missed" if status == "FAILED" else "")
    judge_time(result, exp, factor)
    assert result.status == after and result.declared_s == 10.0 and result.measured_on == "the reference machine"
    if factor and min(wall, cpu) > factor * 10.0:
        assert f"took {wall:.0f} s ({cpu:.0f} CPU s), {min(wall, cpu) / 10:.1f}x the 10 s it declares " \
               f"(limit {factor:g}x" in result.reason
        assert "the reference machine" in result.reason and this_machine() in result.reason
    else:
        assert "declares" not in result.reason


def test_no_declared_time_no_time_check():
    exp = Expectation(metric="val_loss", mode="min", target=1.9, tolerance=0.0, device="cpu")
    result = Result("r", "full", "passed", wall_s=1e6, cpu_s=1e6)
    judge_time(result, exp, 2.0)
    assert result.status == "passed" and result.declared_s is None


def test_this_machine_names_the_cpu_and_its_bf16():
    import torch

    caps = torch.cpu.get_capabilities()
    words = this_machine()
    assert words.startswith(caps.get("cpu_name", "CPU")) and "bf16" in words
    native = any(caps.get(f, False) for f in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    assert ("no native bf16" in words) != native


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_declares_a_valid_result(name):
    cfg = compose_cfg(f"recipe={name}")
    validate(cfg)  # the schema checks the expect block too
    assert "expect" in cfg, f"recipes/{name}.yaml declares no expect block"
    full, short = expectation(cfg.expect, "full"), expectation(cfg.expect, "short")
    assert full.device in ("cpu", "cuda", "any") and full.metric == short.metric
    assert short.overrides, "a short version must shorten the run"
    # The short version's bound is looser than the full one's: less training reaches less.
    assert (short.bound >= full.bound) if full.mode == "min" else (short.bound <= full.bound)
    assert cfg.monitor.metric == full.metric or full.metric.startswith("test_"), (cfg.monitor.metric, full.metric)


def test_invalid_expect_block_is_a_config_error():
    cfg = compose_cfg("recipe=mnist_vae", "expect.mode=lowest", "expect.short.overrides=3")
    from config import problems

    lines = problems(cfg)
    assert any(line.startswith("expect.mode='lowest': must be one of min, max") for line in lines), lines
    assert any(line.startswith("expect.short.overrides=3: must be a list") for line in lines), lines
    cfg = compose_cfg("recipe=mnist_vae", "++expect.wall_time_s=-3", "++expect.short.wall_time_s=0")
    lines = problems(cfg)
    assert any(line.startswith("expect.wall_time_s=-3: ") for line in lines), lines
    assert any(line.startswith("expect.short.wall_time_s=0: must be null or a number > 0") for line in lines), lines


def test_unknown_recipe_exits_2_with_a_suggestion(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.check_recipes", "mnist_vea", f"--out={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown recipe 'mnist_vea'" in proc.stderr and "mnist_vae" in proc.stderr


def test_full_gpu_recipe_is_skipped_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full recipe would run")
    proc, report = check("char_transformer_gpu", "--full", f"--out={tmp_path}", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = report["results"]
    assert row["status"] == "skipped" and "CUDA" in row["reason"] and row["command"] == ""
    assert not (tmp_path / "char_transformer_gpu-full").exists()  # nothing was run


@pytest.mark.slow
def test_missed_target_and_crash_are_reported(mnist_root, tmp_path):
    # A target the short run cannot reach: FAILED, with the value and the rule.
    proc, report = check("mnist_vae_baseline", f"data.root={mnist_root}", "trainer.max_steps=20",
                         "expect.short.target=50", f"--out={tmp_path / 'a'}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = report["results"]
    assert row["status"] == "FAILED" and row["value"] > 150 and row["rule"] == "test_loss <= 51 (target 50 + 1)"
    assert row["extra"]["step"] == 20
    assert "python train.py recipe=mnist_vae_baseline trainer.max_epochs=1" in row["command"]
    # A run that reaches its target in more than twice the time it declares: SLOW, a failure, with both times.
    proc, report = check("mnist_vae_baseline", f"data.root={mnist_root}", "trainer.max_steps=2",
                         "expect.short.target=1000", "++expect.short.wall_time_s=0.5", f"--out={tmp_path / 's'}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = report["results"]
    assert row["status"] == "SLOW" and row["declared_s"] == 0.5 and min(row["wall_s"], row["cpu_s"]) > 1.0
    assert "x the 0.5 s it declares (limit 2x" in row["reason"] and report["time_factor"] == 2.0
    assert "SLOW" in proc.stdout and "0.5 s" in proc.stdout and f"this machine: {this_machine()}" in proc.stdout
    # A run that cannot start: error with the reason from its log; the next recipe still runs.
    proc, report = check("mnist_vae_baseline", "mnist_vae", "data.root=/nonexistent/data", "trainer.max_steps=2",
                         f"--out={tmp_path / 'b'}")
    assert proc.returncode == 1
    assert [r["status"] for r in report["results"]] == ["error", "error"]
    assert all("/nonexistent/data" in r["reason"] for r in report["results"]), report


@pytest.mark.slow
def test_the_vae_short_versions_reach_their_targets(mnist_root, tmp_path):
    # Results, not speed: --time-factor=0 (this suite runs beside other work; the time check has its own tests,
    # and the declared times are checked by `make check-recipes`).
    names = ["mnist_vae", "mnist_vae_baseline"]
    proc, report = check(*names, f"data.root={mnist_root}", f"--out={tmp_path}", "--time-factor=0")
    assert report is not None, proc.stdout + proc.stderr
    rows = {r["recipe"]: r for r in report["results"]}
    assert sorted(rows) == names
    for name, row in rows.items():
        assert row["status"] == "passed", f"{name}: {row['reason']}\n{proc.stdout[-3000:]}"
        assert row["value"] is not None and (tmp_path / f"{name}-short" / "config.yaml").is_file()
        assert row["extra"]["step"] == (429 if name == "mnist_vae" else 468)  # one epoch: 55,000 | 60,000 images
    assert proc.returncode == 0


@pytest.mark.slow
def test_ctrl_c_reports_what_ran_and_the_run_keeps_its_checkpoint(mnist_root, tmp_path):
    """Ctrl-C in a terminal signals the checker and its run together (one process group): the run finishes its
    step and writes a checkpoint, the checker reports and exits 130."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "experiments.check_recipes", "mnist_vae_baseline", "mnist_vae",
                             f"data.root={mnist_root}", "trainer.max_epochs=50", "trainer.log_interval=10",
                             f"--out={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            # a terminal's Ctrl-C: SIGINT handled even when pytest itself runs in the background
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        metrics = tmp_path / "mnist_vae_baseline-short" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metrics.is_file(), "the run never started logging"
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:  # a failed assertion must not leave the checker training in the background
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    report = json.loads((tmp_path / "check.json").read_text())
    assert [(r["recipe"], r["status"]) for r in report["results"]] == [("mnist_vae_baseline", "skipped"),
                                                                        ("mnist_vae", "skipped")]
    assert all("interrupted" in r["reason"] for r in report["results"])
    assert list((tmp_path / "mnist_vae_baseline-short" / "checkpoints").glob("step-*.pt")), out
    assert not (tmp_path / "mnist_vae-short").exists()  # the next recipe never started


@pytest.mark.slow
def test_timeout_stops_the_run_gracefully(mnist_root, tmp_path):
    """--timeout sends SIGTERM: the run stops after its step with a checkpoint; the check says why it failed."""
    proc, report = check("mnist_vae_baseline", f"data.root={mnist_root}", "trainer.max_epochs=50", "--timeout=12",
                         f"--out={tmp_path}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = report["results"]
    assert row["status"] == "error" and row["reason"] == "did not finish within 12 s"
    assert list((tmp_path / "mnist_vae_baseline-short" / "checkpoints").glob("step-*.pt"))
