"""Whole runs of the GPU recipe in other processes: a replay (python -m experiments.replay) within its stated
tolerance, and trainer.strategy=ddp under torchrun (nccl on CUDA, gloo on a CPU) equal to the single process."""

from __future__ import annotations

import json

import pytest

from experiments.replay import GPU_TOLERANCE, compare
from tests.conftest import compose_cfg
from tests.cuda.harness import DEVICES, max_rel_diff, overrides, pick, read_jsonl, run_command, train
from trainer.run import run


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_short_run_of_the_recipe_replays_within_its_tolerance(device, tmp_path):
    """The recipe as it is (bf16, fused AdamW, compile and TF32 on CUDA), evaluated twice: relative 1e-3 on CUDA,
    bit for bit on a CPU."""
    steps, log, evaluate = pick(device, (100, 10, 50), (20, 5, 10))
    run(compose_cfg(*overrides(device, f"trainer.max_steps={steps}", f"trainer.log_interval={log}",
                               f"trainer.eval_interval={evaluate}")), tmp_path / "run")
    run_command(["-m", "experiments.replay", str(tmp_path / "run"), "--out", str(tmp_path / "replay")],
                tmp_path / "replay.log", timeout=1800)
    verdict = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert verdict["tolerance"] == pick(device, GPU_TOLERANCE, 0.0)
    assert verdict["match"] and verdict["compared"] >= 10
    _, rows = compare(tmp_path / "run", tmp_path / "replay", 0.0)
    numeric = [(a, b) for _, a, b, _ in rows if isinstance(a, (int, float)) and isinstance(b, (int, float))]
    assert max(abs(a - b) / max(abs(a), abs(b), 1e-30) for a, b in numeric) <= verdict["tolerance"]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_ddp_with_one_process_logs_the_single_process_losses(device, tmp_path):
    # dropout off: DDP reseeds each rank's dropout stream after build (seed + rank), the single process does not
    steps, log = pick(device, (30, 10), (12, 4))
    args = overrides(device, f"trainer.max_steps={steps}", f"trainer.log_interval={log}", "regularize.dropout=0")
    output = run_command(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                          "trainer.strategy=ddp", *args, f"hydra.run.dir={tmp_path / 'ddp'}"],
                         tmp_path / "ddp.log", timeout=1200, env={"NCCL_DEBUG": "INFO"} if device == "cuda" else None)
    if device == "cuda":
        assert "NCCL INFO" in output, "the process group did not use nccl"
    single = train(args, tmp_path / "single").log.series("train/loss")
    ddp = {r["step"]: r["train/loss"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "train/loss" in r}
    assert max_rel_diff(single, ddp) <= pick(device, 1e-3, 0.0)
