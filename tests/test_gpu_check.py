"""bench.gpu_check: its dry version (no CUDA: the plan, exit 0), its CPU mode (the harness itself, run), and that
its checks can fail: a host read per training step, a crashing check that must not stop the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from tests.conftest import ROOT, need_data

IN_PROCESS = ["bf16_autocast", "fp16_grad_scaler", "fused_adamw", "host_syncs", "throughput", "tf32", "recipe"]


def cpu_mode(tmp_path, *names: str) -> tuple[int, dict[str, dict]]:
    need_data()  # the checks train the char-GPT on tinyshakespeare
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--threads", "1", "--out", str(out), "--only", ",".join(names)])
    return code, {c["check"]: c for c in json.loads(out.read_text())["checks"]}


def test_without_cuda_it_prints_the_plan_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the dry version even on a machine with a GPU
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "x" / "gpu_check.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "CUDA is not available here: nothing was run" in out.stdout
    for c in gpu_check.CHECKS:
        assert f". {c.name}: " in out.stdout
    ddp = "python -m torch.distributed.run --standalone --nproc_per_node=1 train.py trainer.strategy=ddp $S"
    assert ddp in out.stdout
    assert "python -m experiments.replay $O/replay/run --out $O/replay/replay" in out.stdout
    assert "python train.py recipe=char_transformer_gpu trainer.progress=plain" in out.stdout
    assert "S='recipe=char_transformer_gpu trainer.device=cuda " in out.stdout
    assert not (tmp_path / "x").exists()  # nothing run, nothing written


@pytest.mark.slow
def test_the_cpu_mode_runs_the_in_process_checks(tmp_path):
    """Nine short runs of a small char-GPT: ~15 s on 2 idle cores, ~55 s on 2 busy ones."""
    code, checks = cpu_mode(tmp_path, *IN_PROCESS)
    assert code == 0
    assert {n: c["status"] for n, c in checks.items()} == {
        "bf16_autocast": "ok", "fp16_grad_scaler": "ok", "fused_adamw": "ok", "host_syncs": "ok", "throughput": "ok",
        "tf32": "skipped", "recipe": "skipped"}
    assert checks["bf16_autocast"]["figures"]["linear dtype"] == "bfloat16"
    fp16 = checks["fp16_grad_scaler"]["figures"]
    assert fp16["overflows"] == "3 (clean run: 0)" and fp16["step"] == fp16["schedule step"] == 12
    assert fp16["scale"] == "512 (clean: 4096)"  # 4096 / 2^3: halved once per overflow
    assert checks["host_syncs"]["figures"]["guarded steps"] == 12 - 4
    assert not (tmp_path / "work").exists()  # passed checks leave no checkpoints behind


@pytest.mark.slow
def test_the_cpu_mode_runs_compile_replay_and_gloo_ddp(tmp_path):
    """The subprocess checks (torchrun, experiments.replay) and Inductor's compilation: ~2 min on 2 busy cores."""
    code, checks = cpu_mode(tmp_path, "compile", "replay", "ddp")
    assert code == 0, checks
    assert all(c["status"] == "ok" for c in checks.values())
    assert checks["replay"]["figures"]["tolerance"] == 0.0  # bit for bit on a CPU
    assert checks["ddp"]["figures"]["backend"] == "gloo"


def test_a_host_read_in_every_training_step_fails_host_syncs(tmp_path, monkeypatch):
    from trainer.loop import Trainer

    update = Trainer._update

    def reads_the_loss(self, step_loss, logging_now):
        float(step_loss)  # what `print(loss.item())` in the loop would do: a host sync per step on a GPU
        return update(self, step_loss, logging_now)

    monkeypatch.setattr(Trainer, "_update", reads_the_loss)
    code, checks = cpu_mode(tmp_path, "host_syncs")
    assert code == 1
    assert checks["host_syncs"]["status"] == "FAILED"
    assert "host read Tensor.__float__() during a training step" in checks["host_syncs"]["detail"]
    assert float(torch.ones(())) == 1.0  # the guard is gone afterwards


def test_a_crashing_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def crash(ctx):
        raise ZeroDivisionError("boom")

    bf16 = next(c for c in gpu_check.CHECKS if c.name == "bf16_autocast")
    monkeypatch.setattr(bf16, "run", crash)
    code, checks = cpu_mode(tmp_path, "bf16_autocast", "fused_adamw")
    assert code == 1
    assert checks["bf16_autocast"]["status"] == "FAILED"
    assert "ZeroDivisionError: boom" in checks["bf16_autocast"]["detail"]
    assert (tmp_path / "work" / "bf16_autocast" / "traceback.txt").is_file()
    assert checks["fused_adamw"]["status"] == "ok"


def test_unknown_check_names_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--only", "bf16,compile"])
    assert e.value.code == 2
    assert "--only: unknown check(s) bf16; the checks are bf16_autocast" in capsys.readouterr().err


def test_without_the_data_root_its_runs_skip_with_one_line_and_fail_under_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_DATA_ROOT", raising=False)
    monkeypatch.delenv("CI", raising=False)
    line = "test data not found: KILN_DATA_ROOT is not set: it must name the folder with MNIST/raw/"
    with pytest.raises(pytest.skip.Exception, match=line):
        cpu_mode(tmp_path, "fused_adamw")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=line):
        cpu_mode(tmp_path, "fused_adamw")
