"""experiments.compare end to end on a tiny regression task (tests/experiments/compare_toy.py, seconds per run):
Ctrl-C and the same command again, equal budgets, diverged trials, paired seeds, a report whose numbers are the
runs' own, the printed command reproducing a run, worker processes, and bad input as clear messages."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from experiments.compare.cli import main
from experiments.compare.plan import build_plan, compose
from experiments.sweep import Ledger, job_key
from tests.conftest import ROOT
from tests.experiments.compare_toy import Regression

CONF = Path(__file__).resolve().parent / "conf"
TOY = [f"hydra.searchpath=[file://{CONF}]", "task=compare_toy"]
# scale 100 makes SGD overflow within a 5-step rung-0 trial at its larger grid learning rates: diverged trials.
ARGS = ["optimizer=sgd,adam", *TOY, "task.scale=100", "trainer.max_steps=45", "trainer.log_interval=1",
        "--seeds", "2"]
RUNGS = {"r0": (11, 5), "r1": (3, 15), "r2": (1, 45)}  # trials x steps


def run_main(args: list[str]) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One comparison, interrupted by a real SIGINT in the middle of a trial, then the same command again."""
    out = tmp_path_factory.mktemp("compare")
    args = [*ARGS, "--out", str(out)]
    batches = itertools.count()
    original = Regression.train_batch

    def train_batch(self, indices):  # Ctrl-C while the comparison's 200th training batch is drawn
        if next(batches) == 200:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Regression, "train_batch", train_batch)
        first = run_main(args)
    ledger = Ledger(out / "trials")
    ended_before = {k for k, e in ledger.entries().items()  # finished, or diverged: results, never run again
                    if e["status"] == "finished" or "NonFiniteError" in (e.get("error") or "")}
    second = run_main(args)
    doc = json.loads((out / "compare.json").read_text())
    return SimpleNamespace(out=out, args=args, first=first, second=second, ended_before=ended_before,
                           ledger=ledger, doc=doc)


def test_ctrl_c_stops_cleanly_and_the_same_command_runs_only_what_is_missing(compared):
    first, second, ledger = compared.first, compared.second, compared.ledger
    assert first.code == 130 and "Traceback" not in first.err
    assert "interrupted." in first.err and "Continue with the same command" in first.err
    assert shlex.join(["python", "-m", "experiments.compare", *compared.args]) in " ".join(first.err.split())
    assert second.code == 0, second.err
    n = len(compared.ended_before)
    assert n > 10 and f"{n} read from the ledger" in second.out
    lines = ledger.lines()
    ended = [e["key"] for e in lines if e["status"] in ("finished", "failed")]
    assert len(ended) == len(set(ended))  # nothing that had ended ran again
    interrupted = [e for e in lines if e["status"] == "interrupted"]
    assert len(interrupted) == 1  # the trial the signal stopped: recorded, then run again from the start
    run_dir = ledger.path.parent / interrupted[0]["run_dir"]
    assert (run_dir / "previous_attempt_1").is_dir() and (run_dir / "final_metrics.json").is_file()
    assert ledger.entries()[interrupted[0]["key"]]["status"] == "finished"
    assert len(ledger.entries()) == len(compared.doc["trials"])  # every trial once, no other job in the ledger


def test_every_option_spends_the_same_steps(compared):
    trials = compared.doc["trials"]
    charged = {}
    for option in ("sgd", "adam"):
        mine = [t for t in trials if t["option"] == option and t["phase"] != "seed"]
        assert {p: (sum(t["phase"] == p for t in mine), {t["steps"] for t in mine if t["phase"] == p})
                for p in RUNGS} == {p: (n, {s}) for p, (n, s) in RUNGS.items()}
        charged[option] = sum(t["steps"] for t in mine)  # pruned and diverged trials included
    assert charged == {"sgd": 11 * 5 + 3 * 15 + 45, "adam": 11 * 5 + 3 * 15 + 45}
    assert {r["option"]: r["tuning_steps"] for r in compared.doc["rows"]} == charged


def test_diverged_trials_are_counted(compared):
    for row in compared.doc["rows"]:
        mine = [t for t in compared.doc["trials"] if t["option"] == row["option"] and t["phase"] != "seed"]
        diverged = [t for t in mine if t["status"] == "diverged"]
        assert row["diverged_share"] == pytest.approx(len(diverged) / len(mine))
        for t in diverged:  # a non-finite loss stopped the run, or it ended with a non-finite metric; never ranked
            key = json.loads((Path(t["run_dir"]) / "status.json").read_text())["key"]
            entry = compared.ledger.entries()[key]
            final = json.loads((Path(t["run_dir"]) / "final_metrics.json").read_text()) \
                if entry["status"] == "finished" else {}
            assert "NonFiniteError" in (entry["error"] or "") or not math.isfinite(final["val_loss"])
            assert t["value"] is None
    sgd = next(r for r in compared.doc["rows"] if r["option"] == "sgd")
    assert sgd["diverged_share"] > 0


def test_seed_k_gives_every_option_the_same_weights_and_batches(compared):
    from trainer.build import build

    seeds = [t for t in compared.doc["trials"] if t["phase"] == "seed"]
    assert sorted({t["seed"] for t in seeds}) == [1, 2] and len(seeds) == 4
    first_loss, weights, batches = {}, {}, {}
    for t in seeds:
        run_dir = Path(t["run_dir"])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        first_loss[t["option"], t["seed"]] = next(r["train/loss"] for r in rows if r["step"] == 1)
        parts = build(OmegaConf.load(run_dir / "config.yaml"))  # the config the run recorded
        weights[t["option"], t["seed"]] = {k: v.clone() for k, v in parts.model.state_dict().items()}
        batches[t["option"], t["seed"]] = torch.stack([parts.sampler.indices(s) for s in range(45)])
    for s in (1, 2):  # same seed: the same start and the same data order, whatever the optimizer
        assert first_loss["sgd", s] == first_loss["adam", s]  # the loss before the first update
        for k in weights["sgd", s]:
            assert torch.equal(weights["sgd", s][k], weights["adam", s][k])
        assert torch.equal(batches["sgd", s], batches["adam", s])
    assert first_loss["sgd", 1] != first_loss["sgd", 2]  # another seed: another start
    assert not torch.equal(weights["sgd", 1]["weight"], weights["sgd", 2]["weight"])
    assert not torch.equal(batches["sgd", 1], batches["sgd", 2])


def test_the_report_holds_the_runs_own_numbers(compared):
    doc, out = compared.doc, compared.out
    assert doc["metric"] == "val_loss" and doc["test_metric"] == "test_loss" and doc["baseline"] == "sgd"
    for t in doc["trials"]:
        run_dir = Path(t["run_dir"])
        status = json.loads((run_dir / "status.json").read_text())
        assert compared.ledger.dirs()[status["key"]] == run_dir.name  # the ledger's own directory for this trial
        if t["status"] == "finished":
            assert t["value"] == json.loads((run_dir / "final_metrics.json").read_text())["val_loss"]
    for row in doc["rows"]:
        seeds = {t["seed"]: t["value"] for t in doc["trials"] if t["phase"] == "seed" and t["option"] == row["option"]}
        assert {int(k): v for k, v in doc["per_seed"][row["option"]].items()} == seeds
        assert row["val_mean"] == pytest.approx(sum(seeds.values()) / 2)
        chosen = [t for t in doc["trials"] if t["option"] == row["option"] and t["phase"] == "r2"]
        assert row["lr"] == chosen[0]["lr"]  # one trial at the full budget: its LR is the setting
    adam = next(r for r in doc["rows"] if r["option"] == "adam")
    assert adam["verdict"] in ("better", "worse", "no detectable difference") and 0 <= adam["p_holm"] <= 1
    report = (out / "report.md").read_text()
    assert "| **sgd** (baseline) |" in report and "| adam |" in report and doc["shared_config_hash"] in report
    for name in ("learning_curves", "lr_sensitivity", "final_per_seed", "time_to_target"):
        assert f"({name}.png)" in report and (out / f"{name}.png").stat().st_size > 5000
    assert (out / "compare.csv").read_text().splitlines()[0].startswith("option,baseline,lr")
    assert "optimizer on Regression" in compared.second.out  # the table


def test_the_default_target_is_reached_by_the_baseline_median_run(compared):
    """Two seeds: the target is the worse of the baseline's two best evaluations, so both its runs reach it and
    every option's speed-up is a number (or "never" for a median run that misses), not "-"."""
    doc = compared.doc
    bests = []
    for t in doc["trials"]:
        if t["phase"] == "seed" and t["option"] == "sgd":
            rows = [json.loads(line) for line in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            bests.append(min(r["eval/val_loss"] for r in rows if "eval/val_loss" in r))
    assert doc["target"] == max(bests)
    sgd, adam = (next(r for r in doc["rows"] if r["option"] == o) for o in ("sgd", "adam"))
    assert sgd["ttt_hit_rate"] == 1.0 and sgd["ttt_median_steps"] != "inf"
    assert adam["speedup_steps"] is not None


def test_the_printed_command_reproduces_a_final_run(compared, tmp_path):
    trial = next(t for t in compared.doc["trials"] if t["phase"] == "seed" and t["option"] == "adam")
    env_part, *command = shlex.split(trial["command"])
    assert env_part.startswith("OMP_NUM_THREADS=") and command[:2] == ["python", "train.py"]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *command[2:], f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": env_part.split("=")[1]})
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "final_metrics.json").read_text())
    original = json.loads((Path(trial["run_dir"]) / "final_metrics.json").read_text())
    assert (again["val_loss"], again["test_loss"]) == (original["val_loss"], original["test_loss"])


def test_an_unreachable_target_is_a_reported_miss(compared):
    again = run_main([*compared.args, "--target", "-1"])  # a mean squared error never gets below 0
    assert again.code == 0, again.err
    assert "0 trials run" in again.out
    doc = json.loads((compared.out / "compare.json").read_text())
    assert doc["target"] == -1 and all(r["ttt_hit_rate"] == 0 for r in doc["rows"])
    assert "no run reached the target -1" in (compared.out / "report.md").read_text()


def test_screening_runs_in_worker_processes_with_the_threads_divided(tmp_path):
    result = run_main(["optimizer=sgd,adam", *TOY, "trainer.max_steps=12", "--screen", "--seeds", "2", "--jobs", "2",
                       "--out", str(tmp_path)])
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "compare.json").read_text())
    cores = len(os.sched_getaffinity(0))
    assert doc["screen"] and doc["threads_per_job"] == max(1, cores // 2)
    assert [(t["phase"], t["status"]) for t in doc["trials"]] == [("seed", "finished")] * 4
    for t in doc["trials"]:
        assert json.loads((Path(t["run_dir"]) / "trial.json").read_text())["threads"] == max(1, cores // 2)
        assert "optimizer.lr" not in t["command"]  # screening: each option's default
    assert "SCREENING" in (tmp_path / "report.md").read_text()


def test_trial_configs_are_what_the_full_command_line_composes():
    plan = build_plan(["optimizer=lion,sgd", *TOY, "optimizer.weight_decay=0.1", "trainer.seed=3"], seeds=2,
                      screen=False, baseline=None, tune=["regularize.weight_decay=0,0.1"], evals=10, command=[])
    assert plan.tuning_seed == 3 and plan.seeds == [4, 5]
    for option in plan.options:
        args = plan.overrides(option, 7, 4, -2.5, (("regularize.weight_decay", "0.1"),))
        fast = plan.config(option, args)
        full = compose(args)
        assert OmegaConf.to_container(fast, resolve=True) == OmegaConf.to_container(full, resolve=True)
        assert job_key(args[2:], fast) == job_key(args[2:], full)
        assert fast.optimizer.lr == pytest.approx(option.default_lr * 10 ** -1.25, rel=1e-2)


def test_any_key_can_be_the_axis():
    plan = build_plan(["regularize.weight_decay=0,0.1", *TOY, "optimizer=adamw", "trainer.max_steps=90"], seeds=2,
                      screen=False, baseline="0.1", tune=[], evals=10, command=[])
    assert [o.label for o in plan.options] == ["0", "0.1"] and plan.baseline.label == "0.1"
    for option, wd in zip(plan.options, (0.0, 0.1), strict=True):
        cfg = plan.config(option, plan.overrides(option, 10, 1, 0.0))
        assert cfg.regularize.weight_decay == wd == cfg.optimizer.weight_decay  # interpolations follow
    assert plan.shared_hash() == build_plan(["regularize.weight_decay=0,0.2", *TOY, "optimizer=adamw",
                                             "trainer.max_steps=90"], seeds=2, screen=False, baseline=None, tune=[],
                                            evals=10, command=[]).shared_hash()  # the axis is not shared


def test_rung_trials_are_scaled_copies_of_the_full_run():
    """A warmup of 100 steps in a 900-step run is 0.111 of it: 11 steps in a rung-0 trial of 100, 100 in the full
    run; fractions already scale; a plateau schedule's cooldown counts evaluations and stays."""
    from schedules import Horizon

    plan = build_plan(["schedule=cosine_warmup,plateau", *TOY, "trainer.max_steps=900", "schedule.warmup=100"],
                      seeds=2, screen=False, baseline=None, tune=[], evals=10, command=[])
    assert {o.label: o.scaled for o in plan.options} == {"cosine_warmup": [f"schedule.warmup={100 / 900!r}"],
                                                         "plateau": [f"schedule.warmup={100 / 900!r}"]}
    cosine = plan.options[0]
    for steps, warmup in ((100, 11), (300, 33), (900, 100)):
        cfg = plan.config(cosine, plan.overrides(cosine, steps, 0, 0.0))
        assert Horizon(steps, plan.steps_per_epoch).steps(cfg.schedule.warmup) == warmup
    plan = build_plan(["optimizer=sgd,adam", *TOY, "trainer.max_steps=900", "schedule=multistep",
                       "schedule.milestones=[300,0.9]"], seeds=2, screen=False, baseline=None, tune=[], evals=10,
                      command=[])
    assert plan.options[0].scaled == [f"schedule.milestones=[{300 / 900!r},0.9]"]


@pytest.mark.parametrize(("args", "messages"), [
    (["optimizer=adamw,adamx", "trainer.max_stepz=3", "--seeds", "1"],
     ["optimizer=adamx: no such option in conf/optimizer/; did you mean 'adam'?",
      "trainer.max_stepz=3: unknown key; did you mean 'trainer.max_steps'?", "--seeds 1: the paired test needs"]),
    (["optimiser=adamw,lion"], ["optimiser=adamw: unknown key; did you mean 'optimizer'?"]),
    (["optimizer=adamw"], ["no compared axis: list the options with commas"]),
    (["optimizer=adamw,lion", "schedule=wsd,cosine"], ["one compared axis at a time, got 2"]),
    (["optimizer=adamw,adamw", *TOY], ["optimizer: adamw listed twice"]),
    (["optimizer=adamw,lion", *TOY, "--baseline", "sgd"], ["--baseline sgd: not one of the options"]),
    (["optimizer=adamw,lion", *TOY, "monitor.metric=test_loss"],
     ["monitor.metric=test_loss: compare selects and times on a validation metric"]),
    (["optimizer=adamw,lion", *TOY, "optimizer.lr=-1"], ["optimizer.lr=-1"]),
    (["optimizer=adamw,lion", *TOY, "--tune", "regularize.weight_decya=0,1"], ["has no key regularize.weight_decya"]),
    (["optimizer=adamw,lion", *TOY, "trainer.max_steps=5"], ["successive halving needs at least 9"]),
    (["trainer.seed=1,2", *TOY], ["trainer.seed: compare sets it in every trial (the paired seeds)"]),
])
def test_bad_input_is_a_clear_message(args, messages, tmp_path):
    result = run_main([*args, "--out", str(tmp_path)])
    assert result.code == 2 and "Traceback" not in result.err
    text = " ".join(result.err.split())
    for m in messages:
        assert m in text, text
    assert not (tmp_path / "trials").exists()  # nothing ran


def test_weight_averaging_is_an_axis_and_its_durations_scale():
    """`average=none,ema,swa` compares averaging against none; SWA's one snapshot per epoch becomes a fraction of the
    run, so a rung trial takes its snapshots as the full run does."""
    plan = build_plan(["average=none,ema,swa", *TOY, "trainer.max_steps=900"], seeds=2, screen=False, baseline="none",
                      tune=[], evals=10, command=[])
    assert [o.label for o in plan.options] == ["none", "ema", "swa"]
    targets = [plan.config(o, plan.overrides(o, 100, 0, 0.0)).get("average") for o in plan.options]
    assert not targets[0] and [t._target_ for t in targets[1:]] == ["optim.averaging.EMA", "optim.averaging.SWA"]
    swa = plan.options[2]
    assert swa.scaled == [f"average.every={plan.steps_per_epoch / 900!r}"] and plan.options[1].scaled == []
