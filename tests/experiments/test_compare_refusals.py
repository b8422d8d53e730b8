"""What experiments.compare refuses before anything runs, and where its results go: an axis the protocol would
overwrite, options whose full runs differ, paths that cannot be folders, bad flag values; an --out folder holds one
comparison; every trial's directory is taken from the ledger, also when another comparison named it. And
experiments.check_recipes' --out."""

from __future__ import annotations

import copy
import json
import shlex
from argparse import Namespace
from dataclasses import replace
from io import StringIO
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from experiments.compare.cli import default_out, describe
from experiments.compare.plan import PER_TRIAL, axis_problem, build_plan, parse_override
from experiments.sweep import Ledger
from tests.experiments.test_compare import TOY, run_main

AXIS_VALUES = {"trainer.max_steps": "9,18", "trainer.max_epochs": "1,2", "trainer.seed": "1,2",
               "optimizer.lr": "0.01,0.1", "trainer.eval_interval": "2,4", "trainer.checkpoint_interval": "0,5",
               "trainer.pictures": "true,false", "trainer.histogram_interval": "0,5"}


def plan_of(args: list[str], **kw):
    opts = {"seeds": 2, "screen": False, "baseline": None, "tune": [], "evals": 10, "command": []} | kw
    return build_plan(args, **opts)


# -- an axis is really varied, or refused --------------------------------------------------------------------------
def test_every_key_a_trial_gets_from_the_protocol_is_listed():
    """PER_TRIAL is the list the refusals come from: it holds every key Plan.overrides writes after the user's (the
    option's scaled schedule durations and the --tune keys are the option's own and really vary)."""
    plan = plan_of(["optimizer=sgd,adam", *TOY, "trainer.max_steps=45"], tune=["regularize.weight_decay=0,0.1"])
    written = plan.overrides(plan.options[0], 5, 1, 0.0, (("regularize.weight_decay", "0.1"),))[len(plan.shared):]
    keys = {parse_override(a)[0] for a in written} - {"regularize.weight_decay"}
    assert keys <= set(PER_TRIAL) and set(AXIS_VALUES) == set(PER_TRIAL)


@pytest.mark.parametrize("key", sorted(AXIS_VALUES))
def test_an_axis_the_protocol_sets_per_trial_is_refused(key):
    message = axis_problem(key, screen=True)
    if key == "optimizer.lr":  # screening runs every option's value as it is: really varied (below)
        assert message is None and "or use --screen to run these values as they are" in axis_problem(key, False)
        return
    assert message == (f"{key}: compare sets it in every trial ({PER_TRIAL[key]}), so its values would not be "
                       "compared; compare something else")


def test_an_overwritten_axis_is_refused_before_anything_runs(tmp_path):
    result = run_main([f"trainer.max_epochs={AXIS_VALUES['trainer.max_epochs']}", *TOY, "--screen", "--seeds", "2",
                       "--out", str(tmp_path)])
    text = " ".join(result.err.split())
    assert result.code == 2 and result.out == "" and "Traceback" not in result.err
    assert ("trainer.max_epochs: compare sets it in every trial (trainer.max_steps, each rung's budget, replaces it), "
            "so its values would not be compared") in text, text
    assert not any(tmp_path.iterdir())


def test_screening_compares_learning_rates_as_they_are():
    plan = plan_of(["optimizer.lr=0.01,0.1", *TOY, "optimizer=sgd"], screen=True, seeds=1)
    assert [plan.config(o, plan.overrides(o, plan.budget, 1)).optimizer.lr for o in plan.options] == [0.01, 0.1]


def test_a_key_the_protocol_sets_cannot_be_tuned(tmp_path):
    result = run_main(["optimizer=sgd,adam", *TOY, "--tune", "trainer.eval_interval=1,2", "--out", str(tmp_path)])
    assert result.code == 2 and ("--tune trainer.eval_interval=1,2: compare sets it in every trial (the same "
                                 "evaluation steps") in " ".join(result.err.split()), result.err


# -- the steps of a full run ---------------------------------------------------------------------------------------
def test_options_whose_full_runs_differ_are_refused(tmp_path):
    """Budgets in epochs with an axis that changes the epoch's length: 16 steps against 8. The protocol gives every
    option the same steps, so one of them would silently run another length than it asks for."""
    result = run_main(["task.batch_size=16,32", *TOY, "trainer.max_epochs=1", "--screen", "--seeds", "2",
                       "--out", str(tmp_path)])
    text = " ".join(result.err.split())
    assert result.code == 2 and "Traceback" not in result.err and result.out == "", result.err
    assert ("the options' full runs differ: 16: 16 steps (1 epochs), 32: 8 steps (1 epochs); compare gives every "
            "option the same steps: set them with trainer.max_steps=N (the baseline's run is 16)") in text, text
    assert not any(tmp_path.iterdir())


def test_equal_steps_with_epochs_of_different_lengths_are_said_in_the_plan():
    plan = plan_of(["task.batch_size=16,32", *TOY, "trainer.max_steps=32"], screen=True, seeds=1)
    out = StringIO()
    describe(plan, Console(file=out, width=200), Path("x"), 1, 1)
    assert "full run: 32 steps for every option (16: 2 epochs, 32: 4 epochs)" in out.getvalue(), out.getvalue()


# -- a folder holds one comparison ---------------------------------------------------------------------------------
def screen(steps: int) -> list[str]:
    return ["optimizer=sgd,adam", *TOY, f"trainer.max_steps={steps}", "--screen", "--seeds", "1"]


@pytest.mark.slow
def test_an_out_folder_holds_one_comparison_and_resumes_it(tmp_path):
    first = run_main([*screen(4), "--out", str(tmp_path)])
    assert first.code == 0, first.err
    report = (tmp_path / "report.md").read_text()
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    other = run_main([*screen(8), "--out", str(tmp_path)])  # another comparison, the same --out
    assert other.code == 0, other.err
    text = " ".join(other.out.split())
    aside = tmp_path / "previous_comparison_1"
    assert (f"--out {tmp_path} holds another comparison (`python -m experiments.compare {shlex.join(screen(4))} "
            f"--out {tmp_path}`, which differs in budget): its report moves to {tmp_path}/previous_comparison_<n>/; "
            "its trials stay (identical ones are reused)") in text, text
    assert f"moved the earlier comparison's report to {aside}" in text
    assert sorted(p.name for p in aside.iterdir()) == sorted(["comparison.json", "compare.csv", "compare.json",
                                                              "report.md", *figures])
    assert (aside / "report.md").read_text() == report
    assert json.loads((tmp_path / "compare.json").read_text())["budget_steps"] == 8
    again = run_main([*screen(8), "--out", str(tmp_path)])  # the same comparison: resumed in its folder
    assert again.code == 0 and "0 trials run, 2 read from the ledger" in again.out, again.err
    assert "another comparison" not in again.out and not (tmp_path / "previous_comparison_2").exists()


def test_a_folder_with_other_files_is_not_taken(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_main([*screen(4), "--out", str(tmp_path)])
    text = " ".join(result.err.split())
    assert result.code == 2 and result.out == "" and "Traceback" not in result.err
    assert f"--out {tmp_path} holds files that are not a comparison's (notes.txt); give another --out" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_default_out_name_covers_the_whole_comparison():
    """Budget, seeds, learning rate, evaluations, baseline, target and each option's config each make another
    comparison, so another folder."""
    plan = plan_of(["optimizer=sgd,adam", *TOY, "trainer.max_steps=9"])
    args = Namespace(target=None)
    scaled = copy.deepcopy(plan.options[1])
    OmegaConf.update(scaled.cfg, "task.scale", 2.0)
    others = [(replace(plan, budget=18), args), (replace(plan, seeds=[4, 5], tuning_seed=3), args),
              (replace(plan, user_lr="0.01"), args), (replace(plan, eval_every=3), args),
              (replace(plan, baseline=plan.options[1]), args), (plan, Namespace(target=0.5)),
              (replace(plan, options=[plan.options[0], scaled]), args)]
    names = [default_out(p, a).name for p, a in [(plan, args), *others]]
    assert names[0].startswith("optimizer=sgd,adam-") and default_out(plan, Namespace(target=None)).name == names[0]
    assert len(set(names)) == len(names), names


# -- every trial's directory comes from the ledger ---------------------------------------------------------------
@pytest.mark.slow
def test_a_trial_another_comparison_ran_is_read_from_its_own_directory(tmp_path):
    """The same trial under two names: `optimizer=sgd,adam regularize.weight_decay=0` runs sgd's seeds as
    `sgd-seed1-...`; `regularize.weight_decay=0,0.1 optimizer=sgd` finds them in the shared ledger as its option
    `0`, and must read their curves there (every evaluation reaches a target of 1e9: hit rate 2/2 at step 1)."""
    trials = tmp_path / "trials"
    common = [*TOY, "trainer.max_steps=4", "--screen", "--seeds", "2", "--trials", str(trials), "--target", "1e9"]
    first = run_main(["optimizer=sgd,adam", "regularize.weight_decay=0", *common, "--out", str(tmp_path / "a")])
    assert first.code == 0, first.err
    second = run_main(["regularize.weight_decay=0,0.1", "optimizer=sgd", *common, "--out", str(tmp_path / "b")])
    assert second.code == 0 and "2 read from the ledger" in second.out, second.err
    doc = json.loads((tmp_path / "b" / "compare.json").read_text())
    dirs = Ledger(trials).dirs()
    for t in doc["trials"]:
        key = json.loads((Path(t["run_dir"]) / "status.json").read_text())["key"]
        assert Path(t["run_dir"]) == trials / dirs[key]
    mine = [t for t in doc["trials"] if t["option"] == "0"]
    assert {Path(t["run_dir"]).name.split("-")[0] for t in mine} == {"sgd"}  # named by the first comparison
    row = next(r for r in doc["rows"] if r["option"] == "0")
    assert row["ttt_hit_rate"] == 1.0 and row["ttt_median_steps"] == 1


# -- bad paths and flag values: refused before the plan is printed -----------------------------------------------
@pytest.mark.parametrize("flag", ["--out", "--trials"])
def test_a_path_that_cannot_be_a_folder_is_refused(flag, tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        result = run_main([*screen(4), flag, str(path)])
        assert result.code == 2 and "Traceback" not in result.err and result.out == ""
        assert f"{flag} {path}: {tmp_path / 'file'} is a file, not a folder" in " ".join(result.err.split())
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize(("args", "message"), [
    (["--evals", "0"], "--evals 0: must be at least 1"),
    (["--evals", "-3"], "--evals -3: must be at least 1"),
    (["--target", "nan"], "--target nan: must be a finite number"),
    (["--target", "inf"], "--target inf: must be a finite number"),
    (["--target=-inf"], "--target -inf: must be a finite number"),
    (["--tune", "regularize.weight_decay=0,abc", "--dry-run"],
     "--tune regularize.weight_decay=0,abc: [sgd] regularize.weight_decay='abc': must be a number >= 0"),
])
def test_bad_flag_values_are_refused(args, message, tmp_path):
    result = run_main(["optimizer=sgd,adam", *TOY, "trainer.max_steps=9", "--seeds", "2", *args,
                       "--out", str(tmp_path)])
    assert result.code == 2 and "Traceback" not in result.err and result.out == ""
    assert message in " ".join(result.err.split()), result.err
    assert not any(tmp_path.iterdir())


def test_check_recipes_does_not_write_over_a_previous_check(tmp_path, capsys):
    from experiments.check_recipes import main

    (tmp_path / "check.json").write_text('{"previous": true}')
    assert main(["mnist_vae", f"--out={tmp_path}", "--timeout=1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--out {tmp_path} holds a previous check (check.json); give another --out" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["check.json"]
    assert (tmp_path / "check.json").read_text() == '{"previous": true}'
