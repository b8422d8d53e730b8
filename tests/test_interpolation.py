"""A value that cannot be resolved (`${...}`) is bad input like any other: reported before anything runs with its
full key, the expression, why it fails and the fix, exit code 2, no traceback; wherever it sits (the command line,
a group option, a recipe, a sweep, a compare axis, a replayed config). Also `~group` for a group every run needs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import experiments.sweep  # noqa: F401  registers ${kiln.direction:...}, as train.py does
from config import problems
from tests.conftest import ROOT, compose_cfg, run_cli

UNSET = "KILN_TEST_UNSET_VARIABLE"
ENV_FIX = f"the environment variable {UNSET} is not set; set it (export {UNSET}=...) or give a default: " \
          f"${{oc.env:{UNSET},<default>}}"


@pytest.fixture(autouse=True)
def _unset(monkeypatch):
    monkeypatch.delenv(UNSET, raising=False)


@pytest.fixture
def make() -> Iterator[Callable[..., DictConfig]]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        def _make(*overrides: str) -> DictConfig:
            return compose("train", overrides=list(overrides))

        yield _make


@pytest.mark.parametrize("overrides, line", [
    (["optimizer.lr=${trainer.max_step}"],
     "optimizer.lr='${trainer.max_step}': cannot be resolved: the config has no key trainer.max_step; "
     "did you mean ${trainer.max_steps}?"),
    (["optimizer.lr=${.lrr}"],  # relative: next to optimizer.lr
     "optimizer.lr='${.lrr}': cannot be resolved: the config has no key optimizer.lrr; did you mean ${optimizer.lr}?"),
    ([f"optimizer.lr=${{oc.env:{UNSET}}}"], f"optimizer.lr='${{oc.env:{UNSET}}}': cannot be resolved: {ENV_FIX}"),
    (["optimizer.lr=${oc.envv:HOME}"],
     "optimizer.lr='${oc.envv:HOME}': cannot be resolved: no resolver is named 'oc.envv'; did you mean oc.env?"),
    (["optimizer.lr=${kiln.direction:sideways}"],
     "optimizer.lr='${kiln.direction:sideways}': cannot be resolved: the resolver kiln.direction failed "
     "(ValueError: monitor.mode='sideways': use min or max); fix the expression"),
    (["optimizer.lr=${optimizer.weight_decay}", "optimizer.weight_decay=${optimizer.lr}"],
     "optimizer.lr='${optimizer.weight_decay}': cannot be resolved: a reference cycle (optimizer.lr -> "
     "optimizer.weight_decay -> optimizer.lr); give one of these keys a value"),
    ([f"optimizer.betas=[0.9,${{oc.env:{UNSET}}}]"],  # inside a list
     f"optimizer.betas.1='${{oc.env:{UNSET}}}': cannot be resolved: {ENV_FIX}"),
    ([f"regularize.weight_decay=${{oc.env:{UNSET}}}"],  # optimizer.weight_decay: ${regularize.weight_decay}
     "optimizer.weight_decay='${regularize.weight_decay}': cannot be resolved: it refers to regularize.weight_decay, "
     "which cannot be resolved itself (see regularize.weight_decay)"),
], ids=["missing-key", "relative-key", "env", "unknown-resolver", "resolver-raises", "cycle", "list-item",
        "refers-to-broken"])
def test_every_kind_names_key_expression_why_and_fix(make, overrides, line):
    found = problems(make(*overrides, "trainer.max_steps=2"))
    assert line in found
    assert not any("please report this" in x for x in found), found  # no check trips over it afterwards


@pytest.mark.parametrize("key", ["task.batch_size", "schedule.warmup", "task._target_", "norm.eps", "data.root",
                                 "trainer.max_epochs", "monitor.mode"])
def test_every_pass_of_the_validator_steps_around_it(make, key):
    found = problems(make("norm=batchnorm", f"{key}=${{oc.env:{UNSET}}}"))
    assert f"{key}='${{oc.env:{UNSET}}}': cannot be resolved: {ENV_FIX}" in found
    assert not any("please report this" in x for x in found), found


def _own_conf(tmp_path, group: str, text: str) -> str:
    (tmp_path / group).mkdir(parents=True)
    (tmp_path / group / "mine.yaml").write_text(text)
    return f"hydra.searchpath=[file://{tmp_path}]"


def test_in_a_group_option_and_in_a_recipe(make, tmp_path):
    searchpath = _own_conf(tmp_path / "a", "optimizer", "_target_: torch.optim.SGD\n_partial_: true\n"
                                                        f"lr: ${{oc.env:{UNSET}}}\n")
    assert f"optimizer.lr='${{oc.env:{UNSET}}}': cannot be resolved: {ENV_FIX}" in \
        problems(make(searchpath, "optimizer=mine"))
    searchpath = _own_conf(tmp_path / "b", "recipe",
                           "# @package _global_\ntrainer:\n  max_steps: ${trainer.max_step}\n")
    assert "trainer.max_steps='${trainer.max_step}': cannot be resolved: the config has no key trainer.max_step; " \
           "did you mean ${trainer.max_steps}?" in problems(make(searchpath, "recipe=mine"))


def test_the_issues_command_exits_2_without_a_traceback(tmp_path):
    out = run_cli("optimizer.lr=${trainer.no_such_key}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr
    assert "optimizer.lr='${trainer.no_such_key}': cannot be resolved: the config has no key " \
           "trainer.no_such_key" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_a_sweep_checks_every_job_before_the_first_runs(tmp_path):
    from config.cli import sweep_unresolvable

    searchpath = _own_conf(tmp_path / "conf", "optimizer", "_target_: torch.optim.SGD\n_partial_: true\n"
                                                           f"lr: ${{oc.env:{UNSET}}}\n")
    assert sweep_unresolvable([searchpath, "optimizer=sgd,mine"]) == [
        f"optimizer.lr='${{oc.env:{UNSET}}}': cannot be resolved: {ENV_FIX} (in the job: optimizer=mine)"]
    # and on the command line: nothing runs, no sweep directory, exit 2
    sweep_dir = tmp_path / "sweep"
    out = run_cli("-m", "optimizer=adam,sgd", "optimizer.lr=${trainer.max_step}", "trainer.max_steps=2",
                  f"hydra.sweep.dir={sweep_dir}")
    assert out.returncode == 2, out.stderr
    assert "optimizer.lr='${trainer.max_step}': cannot be resolved: the config has no key trainer.max_step; " \
           "did you mean ${trainer.max_steps}?" in out.stderr
    assert "Traceback" not in out.stderr and not sweep_dir.exists()


def test_a_compare_axis_is_refused_before_anything_runs(tmp_path):
    from core.errors import ConfigError
    from experiments.compare.plan import build_plan

    conf = ROOT / "tests" / "experiments" / "conf"
    args = [f"hydra.searchpath=[file://{conf}]", "task=compare_toy", f"optimizer.lr=0.1,${{oc.env:{UNSET}}}"]
    with pytest.raises(ConfigError) as e:
        build_plan(args, seeds=1, screen=True, baseline=None, tune=[], evals=3, command=[])
    assert f"optimizer.lr='${{oc.env:{UNSET}}}': cannot be resolved: {ENV_FIX}" in str(e.value)


def test_a_replay_reports_it_and_replays_a_run_that_interpolated_on_its_command_line(tmp_path, capsys):
    from experiments.replay import main as replay
    from tests.test_resume import toy
    from trainer.run import run

    original = tmp_path / "run"
    run(toy("trainer.max_steps=2"), original, ["optimizer.weight_decay=${optimizer.lr}"])
    assert replay([str(original), f"optimizer.lr=${{oc.env:{UNSET}}}", "--out", str(tmp_path / "r1")]) == 2
    assert f"optimizer.lr='${{oc.env:{UNSET}}}': cannot be resolved: {ENV_FIX}" in capsys.readouterr().err
    assert replay([str(original), "--out", str(tmp_path / "r2")]) == 0  # its overrides.yaml holds `${...}`
    assert json.loads((tmp_path / "r2" / "replay.json").read_text())["match"]


@pytest.mark.parametrize("group", ["optimizer", "clip"])
def test_deleting_a_required_group_asks_to_pick_an_option(group):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"~{group}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    options = ", ".join(sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))
    assert f"~{group}: a run needs one option of the group {group}; pick an option: {group}=<name> ({options}; " \
           f"conf/{group}/)" in out.stderr
    assert "Traceback" not in out.stderr and "interpolation" not in out.stderr


def test_overrides_are_recorded_as_typed(tmp_path):
    out = run_cli("optimizer.weight_decay=${optimizer.lr}", "trainer.max_steps=1", "trainer.eval_interval=0",
                  f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "overrides.yaml"))[0] == \
        "optimizer.weight_decay=${optimizer.lr}"
    assert OmegaConf.load(tmp_path / "config.yaml").optimizer.weight_decay == \
        OmegaConf.load(tmp_path / "config.yaml").optimizer.lr


def test_a_deleted_group_is_a_config_problem_wherever_the_config_comes_from():
    """`~clip` composes (nothing interpolates it) and the run then fails reading cfg.clip; compare ran every trial
    into that failure and exited 0."""
    from core.errors import ConfigError
    from experiments.compare.plan import build_plan

    line = ("clip: missing (~clip?); a run needs one option of the group clip; pick an option: clip=<name> "
            "(adaptive, agc, centralize, layer_scale, none, norm, normalize, soft, trust_ratio, value; conf/clip/)")
    assert line in problems(compose_cfg("~clip"))
    conf = ROOT / "tests" / "experiments" / "conf"
    with pytest.raises(ConfigError) as e:
        build_plan([f"hydra.searchpath=[file://{conf}]", "task=compare_toy", "optimizer=sgd,adam", "~clip"],
                   seeds=2, screen=False, baseline=None, tune=[], evals=3, command=[])
    assert f"[sgd] {line}" in str(e.value)
