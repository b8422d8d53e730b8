"""Each option starts from its own defaults: a recipe's values for a group apply only to the option it names.

`recipe=char_transformer_cpu` is nanoGPT's CPU configuration (AdamW lr 1e-3, betas (0.9, 0.99)); another optimizer
on the command line starts from its own YAML, in a plain run and in a sweep alike, and the command line still wins
over both. The expected option values are read from the option's YAML file (the spec of "its own defaults"); the
recipe's are nanoGPT's published ones, written out here.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from config import validate
from config.cli import unknown_keys
from tests.conftest import ROOT, compose_cfg, run_cli


def own_yaml(group: str, option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / group / f"{option}.yaml"))


def test_the_recipe_values_apply_to_the_option_it_names():
    cfg = compose_cfg("recipe=char_transformer_cpu")
    assert cfg.optimizer._target_ == own_yaml("optimizer", "adamw")["_target_"]
    assert cfg.optimizer.lr == 1e-3 and list(cfg.optimizer.betas) == [0.9, 0.99]  # nanoGPT's CPU configuration
    assert cfg.schedule.warmup == 100 and cfg.schedule.floor == 0.1 and cfg.trainer.max_steps == 2000


def test_another_optimizer_starts_from_its_own_yaml():
    lion = own_yaml("optimizer", "lion")
    cfg = compose_cfg("recipe=char_transformer_cpu", "optimizer=lion")
    assert cfg.optimizer._target_ == lion["_target_"]
    assert cfg.optimizer.lr == lion["lr"] == 1e-4 and list(cfg.optimizer.betas) == lion["betas"]
    # the other groups keep the recipe's values
    assert cfg.task.batch_size == 12 and cfg.schedule.warmup == 100 and cfg.regularize.weight_decay == 0.1
    validate(cfg)

    adamw = own_yaml("optimizer", "adamw")  # Muon's recipe: its lr 6e-3 and adamw_betas stay with Muon
    cfg = compose_cfg("recipe=char_transformer_best_cpu", "optimizer=adamw")
    assert cfg.optimizer.lr == adamw["lr"] and list(cfg.optimizer.betas) == adamw["betas"] == [0.9, 0.999]
    assert "adamw_betas" not in cfg.optimizer
    validate(cfg)


def test_another_schedule_starts_from_its_own_yaml():
    wsd = own_yaml("schedule", "wsd")
    cfg = compose_cfg("recipe=mnist_cnn", "schedule=wsd")
    assert cfg.schedule.warmup == wsd["warmup"] and cfg.schedule.floor == wsd["floor"]  # not 0.03 / 0.01
    validate(cfg)


def test_early_stopping_off_composes_and_validates_under_a_recipe_that_sets_its_patience():
    cfg = compose_cfg("recipe=mnist_cnn", "early_stop=off")  # the recipe's patience has no home here
    assert OmegaConf.to_container(cfg.early_stop) == {}
    validate(cfg)


def test_the_command_line_wins_over_the_recipe_and_the_option():
    # (a guard rather than a regression test: the old composition already did this)
    cfg = compose_cfg("recipe=char_transformer_cpu", "optimizer.lr=3e-4")
    assert cfg.optimizer.lr == 3e-4 and list(cfg.optimizer.betas) == [0.9, 0.99]
    cfg = compose_cfg("recipe=char_transformer_cpu", "optimizer=lion", "optimizer.lr=3e-5", "schedule.warmup=7")
    assert cfg.optimizer.lr == 3e-5 and cfg.schedule.warmup == 7


def test_a_key_of_the_recipe_option_is_unknown_to_another_option():
    problems = unknown_keys(["recipe=char_transformer_best_cpu", "optimizer=adamw", "optimizer.adamw_betas=[0.9,0.9]"])
    assert len(problems) == 1 and problems[0].startswith("optimizer.adamw_betas=")
    assert "did you mean 'optimizer.betas'" in problems[0]


TINY_GPT = ("task.n_layer=1", "task.n_head=2", "task.n_embd=32", "task.block_size=16", "task.batch_size=4",
            "task.eval_batches=1", "task.eval_batch_size=4", "task.sample_chars=0", "trainer.max_steps=1",
            "trainer.eval_interval=1", "trainer.checkpoint_interval=0", "trainer.histogram_interval=0",
            "trainer.pictures=false", "trainer.threads=1", "schedule.warmup=0")


def test_a_sweep_gives_each_option_its_own_values_and_the_manifest_says_where_they_came_from(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40, encoding="utf-8")
    sweep = tmp_path / "sweep"
    out = run_cli("-m", "optimizer=adamw,lion", "recipe=char_transformer_cpu", f"task.text_path={text}", *TINY_GPT,
                  f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    adamw, lion = own_yaml("optimizer", "adamw"), own_yaml("optimizer", "lion")
    for job, (target, lr) in enumerate([(adamw["_target_"], 1e-3), (lion["_target_"], lion["lr"])]):
        for config in (sweep / str(job) / "config.yaml", sweep / str(job) / ".hydra" / "config.yaml"):
            opt = OmegaConf.load(config).optimizer
            assert opt._target_ == target and opt.lr == lr and list(opt.betas) == [0.9, 0.99], (job, config)
        assert json.loads((sweep / str(job) / "status.json").read_text())["status"] == "finished"

    adamw_src = json.loads((sweep / "0" / "manifest.json").read_text())["sources"]
    lion_src = json.loads((sweep / "1" / "manifest.json").read_text())["sources"]
    assert adamw_src["recipe"] == lion_src["recipe"] == "char_transformer_cpu"
    assert adamw_src["options"]["optimizer"] == "adamw" and lion_src["options"]["optimizer"] == "lion"
    assert lion_src["options"]["task"] == "char_transformer" and lion_src["options"]["schedule"] == "cosine_warmup"
    assert adamw_src["from_recipe"]["optimizer.lr"] == 1e-3
    assert adamw_src["from_recipe"]["optimizer.betas"] == [0.9, 0.99]
    assert "optimizer.lr" not in lion_src["from_recipe"]
    assert lion_src["recipe_not_applied"] == {"optimizer": ["adamw"]}
    assert adamw_src["recipe_not_applied"] == {}
    for src in (adamw_src, lion_src):
        assert src["from_recipe"]["trainer.log_interval"] == 100
        assert src["from_recipe"]["regularize.weight_decay"] == 0.1
        # the command line wins: its keys are listed there, not under the recipe
        assert src["from_command_line"]["trainer.max_steps"] == 1 and "trainer.max_steps" not in src["from_recipe"]
        assert src["from_command_line"]["task.batch_size"] == 4 and "task.batch_size" not in src["from_recipe"]
        assert "optimizer" not in src["from_command_line"]  # a pick, listed under options


def test_a_plain_run_gets_the_option_values_and_records_their_sources(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    run_dir = tmp_path / "run"
    out = run_cli("recipe=char_transformer_cpu", "optimizer=lion", f"task.text_path={text}", *TINY_GPT,
                  f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    config = OmegaConf.load(run_dir / "config.yaml")
    sources = json.loads((run_dir / "manifest.json").read_text())["sources"]
    assert config.optimizer.lr == own_yaml("optimizer", "lion")["lr"]
    assert sources["options"]["optimizer"] == "lion" and "optimizer.lr" not in sources["from_recipe"]
    assert sources["from_command_line"]["task.text_path"] == str(text)
