"""`trainer.dry_run=true` (trainer/dry_run.py): the composed config and the derived numbers, then exit 0."""

from __future__ import annotations

import io

import torch
from rich.console import Console
from torch import nn

from tests.conftest import compose_cfg, run_cli
from trainer.dry_run import dry_run, optimizer_state_bytes

VAE_PARAMS = 784 * 400 + 400 + 400 * 40 + 40 + 20 * 400 + 400 + 400 * 784 + 784  # 784-400-(2x20)-400-784


def test_optimizer_state_size_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    n_tensors = len(before)
    adam = compose_cfg("optimizer=adam", "regularize.weight_decay=0.1")
    # exp_avg + exp_avg_sq per parameter, plus a float32 `step` scalar per tensor
    assert optimizer_state_bytes(adam, model) == 2 * n_bytes + 4 * n_tensors
    assert optimizer_state_bytes(compose_cfg("optimizer=sgd"), model) == 0  # no momentum: no state
    assert optimizer_state_bytes(compose_cfg("optimizer=momentum"), model) == n_bytes
    # Muon keeps its state in two inner optimizers: a momentum buffer for the hidden 3x4 weight, AdamW's two
    # moments and step for the other five tensors (the last Linear is the output head).
    hidden = 3 * 4 * 4
    assert optimizer_state_bytes(compose_cfg("optimizer=muon"), model) == hidden + 2 * (n_bytes - hidden) + 4 * 5
    # schedule-free (stepped in train mode): z, and for AdamW exp_avg_sq, per parameter
    assert optimizer_state_bytes(compose_cfg("optimizer=sf_sgd"), model) == n_bytes
    assert optimizer_state_bytes(compose_cfg("optimizer=sf_adamw"), model) == 2 * n_bytes
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dry_run_numbers(mnist_root):
    cfg = compose_cfg(f"data.root={mnist_root}", "trainer.max_epochs=3", "schedule.warmup=0.1",
                      "trainer.grad_accum=2", "trainer.eval_interval=0.5ep", "trainer.device=cpu")
    out = io.StringIO()
    numbers = dry_run(cfg, Console(file=out, width=120))
    assert numbers["steps_per_epoch"] == (60000 - 5000) // 128  # 5000 images held out for validation
    assert numbers["total_steps"] == 3 * 429
    assert numbers["warmup_steps"] == round(0.1 * 3 * 429)
    assert numbers["eval_interval_steps"] == 214 and numbers["checkpoint_interval_steps"] == 429
    assert numbers["micro_batch_size"] == 64
    assert numbers["parameters"] == VAE_PARAMS
    assert numbers["optimizer_state_bytes"] >= 2 * 4 * VAE_PARAMS  # AdamW: two moments per parameter
    assert numbers["device"] == "cpu" and numbers["precision"] == "float32"
    text = out.getvalue()
    assert "_target_: optim.adamw.adamw" in text  # the composed config, resolved
    assert "total_steps" in text and "1,287" in text


def test_dry_run_through_the_cli(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("trainer.dry_run=true", f"data.root={mnist_root}", "trainer.max_steps=20", "schedule.warmup=5",
                  f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr
    for fragment in ["steps_per_epoch", "429", "total_steps", "warmup_steps", "optimizer_state_bytes",
                     "max_steps: 20"]:
        assert fragment in out.stdout, fragment
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final_metrics.json").exists()
