"""Every recipe (recipes/*.yaml) composes, validates, and runs 2 steps through the real CLI.

The recipes run as Hydra multiruns (recipe=a,b,...), grouped by the few overrides a 2-step CPU run needs: batches
of 8 (the GPU transformer recipe's 64 x 256 tokens take ~25 s a step on two CPU cores), no torch.compile, fp32
(bf16 autocast is ~30x slower on a CPU without native bf16; tests/test_cuda_paths_on_cpu.py runs the GPU recipe's
bf16 path on a small model), a warmup of 0 where the schedule has one, one small evaluation batch where the task
takes eval_batches and that batch's figure at the end too (the GPU transformer's whole validation split takes a
minute on a CPU), a validation split of 500 where the task carves one (`++`: Hydra checks a multirun's overrides
against the config without the swept recipe, which may lack the key)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from config import validate
from tests.conftest import ROOT, compose_cfg, need_data, run_cli

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
BASE = ("trainer.max_steps=2", "task.batch_size=8", "trainer.compile=false", "trainer.pictures=false",
        "trainer.eval_interval=2", "trainer.checkpoint_interval=0", "trainer.histogram_interval=0",
        "trainer.log_interval=1", "amp=off")


def _needs(name: str) -> tuple[str, ...]:
    cfg = compose_cfg(f"recipe={name}")
    extra = []
    if "warmup" in cfg.schedule:
        extra.append("++schedule.warmup=0")
    if "eval_batches" in cfg.task:  # the char transformers: one small evaluation batch
        extra += ["++task.eval_batches=1", "++task.eval_batch_size=8", "++task.final_whole_split=false"]
    if cfg.task.get("val_size"):  # the CNN's 5,000 validation images take seconds on one thread
        extra.append("++task.val_size=500")
    return tuple(extra)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_validates(name):
    cfg = compose_cfg(f"recipe={name}")
    validate(cfg)
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"recipe={name}" in text  # the command that runs it


def _scoped_groups() -> set[str]:
    """The groups conf/train.yaml merges a recipe's values into: `optional recipe@<group>: ...` entries."""
    entries = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "train.yaml").defaults, resolve=False)
    keys = [key for e in entries if isinstance(e, dict) for key in e]
    return {key.split("@")[1] for key in keys if key.startswith("optional recipe@")}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_values_sit_with_the_options_it_names(name):
    """A recipe's values for a group are in recipes/<name>/<group>/<option>.yaml, for the option it picks: its own
    file sets no group's values (they would reach whichever option of the group is chosen), and a file named for
    another option, or for a group train.yaml does not scope, would never be merged."""
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    own = OmegaConf.load(ROOT / "recipes" / f"{name}.yaml")
    assert not groups & set(own.keys()), f"recipes/{name}.yaml sets {groups & set(own.keys())}: move them"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        choices = compose("train", overrides=[f"recipe={name}"], return_hydra_config=True).hydra.runtime.choices
    files = sorted((ROOT / "recipes" / name).glob("*/*.yaml"))
    assert files, f"recipes/{name}/ holds no values"
    scoped = _scoped_groups()
    for f in files:
        group, option = f.parent.name, f.stem
        assert group in scoped, f"{f}: conf/train.yaml merges no recipe values into {group}"
        assert choices[group] == option, f"{f}: recipe {name} picks {group}={choices[group]}"


@pytest.mark.slow
def test_every_recipe_runs_two_steps(tmp_path):
    """One test, not one per recipe: the multiruns are shared, and pytest-xdist would start them again on each
    worker that ran a recipe's test."""
    root = need_data()
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name in RECIPES:
        groups[_needs(name)].append(name)
    rows = {}
    for i, (extra, names) in enumerate(sorted(groups.items())):
        sweep_dir = tmp_path / str(i)
        out = run_cli("-m", f"recipe={','.join(names)}", f"data.root={root}", *BASE, *extra,
                      f"hydra.sweep.dir={sweep_dir}", timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        for row in json.loads((sweep_dir / "summary.json").read_text())["runs"]:
            name = next(o.split("=", 1)[1] for o in row["overrides"] if o.startswith("recipe="))
            rows[name] = {**row, "log": out.stdout[-3000:] + out.stderr[-3000:]}
    assert sorted(rows) == RECIPES
    failed = {name: row["error"] for name, row in rows.items() if row["status"] != "finished"}
    assert not failed, "\n".join(f"{name}: {error}" for name, error in failed.items()) + rows[next(iter(failed))]["log"]
    for name, row in rows.items():
        assert row["step"] == 2, name
        assert [k for k in row if k.startswith("final/") and isinstance(row[k], float)], (name, row)
