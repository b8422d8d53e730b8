"""Every recipe (recipes/*.yaml) composes, validates, and runs 2 steps through the real CLI.

The recipes run as Hydra multiruns (recipe=a,b,...), grouped by the few overrides a 2-step CPU run needs: batches
of 8 (the GPU transformer recipe's 64 x 256 tokens take ~25 s a step on two CPU cores), no torch.compile, a warmup
of 0 where the schedule has one, one small evaluation batch where the task takes eval_batches, and that batch's
figure at the end too (the GPU transformer's whole validation split takes a minute on a CPU) (`++`: Hydra checks
a multirun's overrides against the config without the swept recipe, which may lack the key)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_cfg, data_root, run_cli
from trainer.validate import validate

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
BASE = ("trainer.max_steps=2", "task.batch_size=8", "trainer.compile=false", "trainer.pictures=false",
        "trainer.eval_interval=2", "trainer.checkpoint_interval=0", "trainer.histogram_interval=0",
        "trainer.log_interval=1")


def _needs(name: str) -> tuple[str, ...]:
    cfg = compose_cfg(f"recipe={name}")
    extra = []
    if "warmup" in cfg.schedule:
        extra.append("++schedule.warmup=0")
    if "eval_batches" in cfg.task:  # the char transformers: one small evaluation batch
        extra += ["++task.eval_batches=1", "++task.eval_batch_size=8", "++task.final_whole_split=false"]
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


@pytest.fixture(scope="module")
def two_step_runs(tmp_path_factory) -> dict[str, dict]:
    root = data_root()
    if root is None:
        pytest.skip("MNIST not found: set KILN_DATA_ROOT to the folder holding MNIST/raw/")
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name in RECIPES:
        groups[_needs(name)].append(name)
    rows, logs = {}, []
    for i, (extra, names) in enumerate(sorted(groups.items())):
        sweep_dir = tmp_path_factory.mktemp("recipes") / str(i)
        out = run_cli("-m", f"recipe={','.join(names)}", f"data.root={root}", *BASE, *extra,
                      f"hydra.sweep.dir={sweep_dir}", timeout=600)
        logs.append(out.stdout[-3000:] + out.stderr[-3000:])
        assert out.returncode == 0, out.stderr
        for row in json.loads((sweep_dir / "summary.json").read_text())["runs"]:
            name = next(o.split("=", 1)[1] for o in row["overrides"] if o.startswith("recipe="))
            rows[name] = {**row, "log": logs[-1]}
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_two_steps(two_step_runs, name):
    row = two_step_runs[name]
    assert row["status"] == "finished", row["error"] + "\n" + row["log"]
    assert row["step"] == 2
    monitored = [k for k in row if k.startswith("final/") and isinstance(row[k], float)]
    assert monitored, row
