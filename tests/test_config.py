"""Composition: every option of every group composes, builds and trains a few steps; recipes apply first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import config.cli
from core.errors import ConfigError
from tests.conftest import compose_cfg, run_cli
from trainer.build import build
from trainer.loop import Trainer

GROUPS = ["optimizer", "schedule", "norm", "clip", "amp", "early_stop", "task", "regularize", "trainer"]


def options(group: str) -> list[str]:
    return config.cli.options(group)  # conf/<group>/*.yaml and the ConfigStore's (trainer: default)


def test_every_group_has_its_issue_options():
    assert set(options("optimizer")) >= {
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam", "adafactor", "muon", "lion",
        "lamb", "nsgda", "adalo", "sm3", "amos", "smmf", "adam_atan2", "adam_softplus", "adams", "cpr", "diffgrad",
        "adamomentum", "adanorm", "lookahead", "am_sgd", "am_adamw", "gl_fractional", "adamw2", "prodigy",
        "dadapt_adam", "soap", "shampoo", "sf_sgd", "sf_adamw", "sf_radam"}
    assert set(options("schedule")) >= {
        "constant", "warmup_linear", "warmup_exp", "step", "multistep", "exponential", "cosine", "cosine_warmup",
        "sgdr", "poly", "wsd", "inverse_sqrt", "plateau"}
    assert set(options("norm")) >= {"none", "batchnorm", "layernorm", "rmsnorm"}
    assert set(options("clip")) >= {"none", "norm", "value", "adaptive", "agc", "soft", "normalize", "trust_ratio",
                                    "centralize", "layer_scale"}
    assert set(options("task")) >= {"mnist_vae", "mnist_cnn", "char_transformer"}
    assert set(options("amp")) == {"off", "bf16", "fp16"}
    assert set(options("early_stop")) == {"off", "on"}


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
def test_every_option_trains_five_steps_through_the_cli(group, mnist_root, tmp_path):
    """One multirun per group (`python train.py -m group=a,b,c`): every YAML composes, builds and trains."""
    opts = [o for o in options(group) if (group, o) != ("amp", "fp16")]  # fp16 needs a GPU (tested below)
    out = run_cli("-m", f"{group}={','.join(opts)}", f"data.root={mnist_root}", "trainer.max_steps=5",
                  "trainer.log_interval=1", "trainer.eval_interval=5", "trainer.pictures=false",
                  "trainer.histogram_interval=0", f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = {row["run_dir"]: row for row in json.loads((tmp_path / "summary.json").read_text())["runs"]}
    for i, option in enumerate(opts):
        assert (tmp_path / str(i) / "final_metrics.json").is_file(), (option, summary.get(str(i)))
        final = json.loads((tmp_path / str(i) / "final_metrics.json").read_text())
        assert final["step"] == 5, option
        metric = {"mnist_cnn": "val_acc", "image_classification": "val_acc"}.get(option, "val_loss")
        assert math.isfinite(final[metric]), option
        assert f"{group}={option}" in (tmp_path / str(i) / "overrides.yaml").read_text()


def test_fp16_on_cpu_is_a_config_error(mnist_root):
    cfg = compose_cfg("amp=fp16", "trainer.device=cpu", f"data.root={mnist_root}")
    with pytest.raises(ConfigError, match="amp=fp16 needs a GPU"):
        build(cfg)


def test_recipe_then_command_line_overrides():
    cfg = compose_cfg("recipe=mnist_vae_baseline")
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-3
    assert cfg.schedule._target_ == "schedules.constant" and cfg.trainer.max_epochs == 10
    cfg = compose_cfg("recipe=mnist_vae_baseline", "optimizer=sgd", "optimizer.lr=0.5", "trainer.max_epochs=2")
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.5 and cfg.trainer.max_epochs == 2


def test_clip_transforms_compose_in_order(mnist_root):
    cfg = compose_cfg("clip=[value,norm]", "clip.norm.max_norm=0.5", f"data.root={mnist_root}")
    parts = build(cfg)
    assert [type(t).__name__ for t in parts.transforms.transforms] == ["ClipValue", "ClipNorm"]
    assert parts.transforms.transforms[1].max_norm == 0.5


def test_norm_reaches_the_vae(mnist_root):
    for kind, cls in [("batchnorm", torch.nn.BatchNorm1d), ("layernorm", torch.nn.LayerNorm),
                      ("rmsnorm", torch.nn.RMSNorm)]:
        model = build(compose_cfg(f"norm={kind}", f"data.root={mnist_root}")).model
        assert sum(isinstance(m, cls) for m in model.modules()) == 2  # encoder and decoder hidden layers


def test_dropout_and_weight_decay_reach_model_and_optimizer(mnist_root):
    parts = build(compose_cfg("regularize.dropout=0.3", "regularize.weight_decay=0.05", f"data.root={mnist_root}"))
    assert {m.p for m in parts.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    decay = {g["name"]: g["weight_decay"] for g in parts.optimizer.param_groups}
    assert decay == {"decay": 0.05, "no_decay": 0.0}


def test_horizon_from_epochs_and_steps(mnist_root, tmp_path: Path):
    parts = build(compose_cfg(f"data.root={mnist_root}", "trainer.max_epochs=3"))
    assert parts.horizon.total_steps == 3 * 429  # (60000 - 5000 validation images) // 128
    parts = build(compose_cfg(f"data.root={mnist_root}", "trainer.max_steps=77", "trainer.eval_interval=2ep"))
    assert parts.horizon.total_steps == 77
    assert Trainer(parts, tmp_path).eval_every == 858
