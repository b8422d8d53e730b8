"""experiments.compare's report on planted results, without training: the default target (reachable by the
baseline's median run, measured on the evaluations the hits are searched in), a chosen setting that never finished
a full-budget tuning run (flagged), and p-values / verdicts only where a test ran."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from experiments.compare import report
from experiments.compare.runs import Result, Trial

STEPS = [10, 20, 30, 40]


def plan(options: list[str], seeds: list[int], mode: str = "min", screen: bool = False) -> SimpleNamespace:
    """What analyse and print_table read from a Plan."""
    return SimpleNamespace(
        metric="val_loss", mode=mode, test_metric="test_loss", screen=screen, seeds=seeds, axis="optimizer",
        options=[SimpleNamespace(label=o) for o in options], tuning_steps=lambda: 0,
        baseline=SimpleNamespace(label=options[0], cfg=SimpleNamespace(task=SimpleNamespace(_target_="t.Toy"))))


def result(tmp_path: Path, option: str, seed: int, evals: list[float] | None, final: float | None = None,
           status: str = "finished") -> Result:
    """A final run whose metrics.jsonl holds `evals` at STEPS and whose final_metrics.json holds `final` (the last
    evaluation unless given: the char-GPT's whole-split figure differs from its evaluations' windows)."""
    run_dir = tmp_path / f"{option}-seed{seed}"
    run_dir.mkdir()
    rows = [{"step": s, "eval/val_loss": v, "time/train_s": s / 10} for s, v in zip(STEPS, evals or [], strict=False)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    value = (final if final is not None else evals[-1]) if status == "finished" else None
    trial = Trial(option, "seed", STEPS[-1], seed, [], None, f"{option}{seed}", run_dir)
    return Result(trial, status, value, {"step": STEPS[-1], "val_loss": value} if value is not None else {}, "",
                  False)


def test_the_default_target_with_an_even_number_of_seeds_is_reached_by_the_baseline_median_run(tmp_path):
    """Two baseline runs with best 1.0 and 2.0: the target is 2.0, the worse of the two middle runs (not their mean,
    1.5, which one of the two never reaches), so the baseline's median time to target exists and so does the
    speed-up."""
    finals = {"a": [result(tmp_path, "a", 1, [3.0, 2.0, 1.5, 1.0]), result(tmp_path, "a", 2, [3.5, 2.8, 2.3, 2.0])],
              "b": [result(tmp_path, "b", 1, [2.0, 1.0, 0.9, 0.8]), result(tmp_path, "b", 2, [2.5, 1.9, 1.8, 1.7])]}
    a = report.analyse(plan(["a", "b"], [1, 2]), None, finals, None)
    assert a.target == 2.0
    base, b = a.rows
    assert (base.ttt.hits, base.ttt.median_step) == (2, 30.0)  # steps 20 and 40
    assert (b.ttt.hits, b.ttt.median_step) == (2, 15.0)  # steps 10 and 20
    assert b.speedup_steps == 2.0 and report.speedup_text(b) == "2x (2x time)"


def test_the_default_target_of_a_metric_to_maximise_is_the_lower_middle_best(tmp_path):
    finals = {"a": [result(tmp_path, "a", s, [0.1, 0.2, 0.3, best]) for s, best in zip([1, 2, 3, 4],
                                                                                       [0.5, 0.7, 0.6, 0.9],
                                                                                       strict=True)],
              "b": [result(tmp_path, "b", s, [0.5, 0.9, 0.9, 0.9]) for s in [1, 2, 3, 4]]}
    a = report.analyse(plan(["a", "b"], [1, 2, 3, 4], mode="max"), None, finals, None)
    assert a.target == 0.6  # bests 0.5, 0.6, 0.7, 0.9: the middle two are 0.6 and 0.7; 0.6 is the worse
    assert (a.rows[0].ttt.hits, a.rows[0].ttt.median_step) == (3, 40.0)
    assert a.rows[1].speedup_steps == 2.0  # b reaches 0.6 at step 20


def test_the_default_target_ignores_the_final_metric_that_is_not_an_evaluation(tmp_path):
    """The char-GPT's final val_loss is the whole split (lower here than any evaluation of 480 windows): the target
    is the median of the evaluations' bests, the values the hits are searched in, so the median run reaches it."""
    finals = {"a": [result(tmp_path, "a", s, [4.0, 3.0, 2.0, best], final=best - 0.5)
                    for s, best in zip([1, 2, 3], [1.0, 1.5, 1.2], strict=True)],
              "b": [result(tmp_path, "b", s, [1.2, 1.1, 1.0, 1.0], final=0.5) for s in [1, 2, 3]]}
    a = report.analyse(plan(["a", "b"], [1, 2, 3]), None, finals, None)
    assert a.target == 1.2
    assert a.target_source == ("the best evaluated val_loss of a's median run (of an even number of runs, the worse "
                               "middle one)")
    assert (a.rows[0].ttt.hits, a.rows[0].ttt.median_step) == (2, 40.0)
    assert a.rows[1].speedup_steps == 4.0


def test_a_given_target_is_kept(tmp_path):
    finals = {"a": [result(tmp_path, "a", 1, [3.0, 2.0, 1.5, 1.0]), result(tmp_path, "a", 2, [3.5, 2.8, 2.3, 2.0])],
              "b": [result(tmp_path, "b", 1, [2.0, 1.0, 0.9, 0.8]), result(tmp_path, "b", 2, [2.5, 1.9, 1.8, 1.7])]}
    a = report.analyse(plan(["a", "b"], [1, 2]), None, finals, 1.5)
    assert (a.target, a.target_source) == (1.5, "--target")
    assert (a.rows[0].ttt.hits, a.rows[0].ttt.median_step) == (1, math.inf)
