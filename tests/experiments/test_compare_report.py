"""experiments.compare's report on planted results, without training: the default target (reachable by the
baseline's median run, measured on the evaluations the hits are searched in), a chosen setting that never finished
a full-budget tuning run (flagged), and p-values / verdicts only where a test ran."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from experiments.compare import report, stats
from experiments.compare.runs import Result, Trial
from experiments.compare.tuning import Point, Tuning, tune
from tests.experiments.test_compare_stats import SIZES, Out, objective

STEPS = [10, 20, 30, 40]


def plan(options: list[str], seeds: list[int], mode: str = "min", screen: bool = False) -> SimpleNamespace:
    """What analyse and print_table read from a Plan."""
    return SimpleNamespace(
        metric="val_loss", mode=mode, test_metric="test_loss", screen=screen, seeds=seeds, axis="optimizer",
        options=[SimpleNamespace(label=o) for o in options], tuning_steps=lambda: 0, rungs=(4, 12, 36),
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
    assert a.target_source.endswith("median run (of an even number of runs, the worse middle one)")
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
    assert a.target_source == "the best evaluated val_loss of a's median run"
    assert (a.rows[0].ttt.hits, a.rows[0].ttt.median_step) == (2, 40.0)
    assert a.rows[1].speedup_steps == 4.0


def test_a_given_target_is_kept(tmp_path):
    finals = {"a": [result(tmp_path, "a", 1, [3.0, 2.0, 1.5, 1.0]), result(tmp_path, "a", 2, [3.5, 2.8, 2.3, 2.0])],
              "b": [result(tmp_path, "b", 1, [2.0, 1.0, 0.9, 0.8]), result(tmp_path, "b", 2, [2.5, 1.9, 1.8, 1.7])]}
    a = report.analyse(plan(["a", "b"], [1, 2]), None, finals, 1.5)
    assert (a.target, a.target_source) == (1.5, "--target")
    assert (a.rows[0].ttt.hits, a.rows[0].ttt.median_step) == (1, math.inf)


def table(p: SimpleNamespace, a: report.Analysis) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The printed table as {option: {column: cell}}, and every printed line."""
    console = Console(width=400, record=True)
    report.print_table(p, a, console)
    lines = console.export_text().splitlines()
    head = [c.strip() for c in next(line for line in lines if line.startswith("┃")).split("┃")[1:-1]]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    return {r[0].removesuffix(" (base)"): dict(zip(head, r, strict=True)) for r in rows}, lines


def test_no_p_value_or_verdict_where_no_test_ran(tmp_path):
    """c has one finished run: no paired test, so no p-value, and it takes no share of Holm's correction (b's
    p-value is its own: one test ran)."""
    finals = {"a": [result(tmp_path, "a", s, [1.0, 1.0, 1.0, v]) for s, v in [(1, 1.0), (2, 1.2), (3, 0.9)]],
              "b": [result(tmp_path, "b", s, [1.0, 1.0, 1.0, v]) for s, v in [(1, 0.8), (2, 1.1), (3, 0.85)]],
              "c": [result(tmp_path, "c", 1, [1.0, 1.0, 1.0, 0.7]), result(tmp_path, "c", 2, None, status="diverged"),
                    result(tmp_path, "c", 3, None, status="diverged")]}
    p = plan(["a", "b", "c"], [1, 2, 3])
    a = report.analyse(p, None, finals, None)
    base, b, c = a.rows
    assert b.p_holm == pytest.approx(stats.paired_test([0.8, 1.1, 0.85], [1.0, 1.2, 0.9]).p)
    assert math.isnan(c.p_holm) and c.verdict == "too few finished runs"
    assert (report.row_dict(c)["p_holm"], report.row_dict(c)["p"]) == (None, None)
    assert report.row_dict(base)["p_holm"] is None
    cells, _ = table(p, a)
    assert (cells["c"]["p Holm"], cells["c"]["verdict"]) == ("-", "too few finished runs")
    assert cells["b"]["p Holm"] == f"{b.p_holm:.2g}" and cells["a"]["p Holm"] == "-"


def test_holm_corrects_over_the_tests_that_ran_only():
    assert stats.holm([0.01, math.nan, 0.04]) == pytest.approx([0.02, math.nan, 0.04], nan_ok=True)
    assert all(math.isnan(v) for v in stats.holm([math.nan, None]))


def test_a_verdict_needs_a_p_value():
    assert stats.verdict(math.nan, -1.0, "min") == "no test"


def test_a_setting_that_never_finished_a_full_budget_trial_is_flagged():
    """The full-budget (rung 2) trial diverges: the next rung-1 setting is taken, and the tuning says so."""
    unstable = objective(1.3)

    def value(rung: int, p: Point) -> Out:
        return Out(None, "diverged", 0) if rung == 2 else unstable(rung, p)

    state = tune(["a", "ok"], list(SIZES), "min", [], lambda batch: [
        (value if o == "a" else unstable)(r, p) for o, r, p in batch])
    t = state["a"]
    full = [p for (r, p) in t.trials if r == 2]
    assert t.flag == ("no full-budget tuning trial finished (1 diverged): the setting is rung 1's best "
                      "(1/3 of the budget), never tuned at the full budget")
    assert t.chosen_rung == 1 and t.chosen not in full
    assert state["ok"].chosen_rung == 2 and state["ok"].flag == ""


def test_the_report_flags_a_setting_without_a_full_budget_tuning_run(tmp_path):
    finals = {o: [result(tmp_path, o, s, [3.0, 2.0, 1.5, 1.0]) for s in (1, 2)] for o in ("a", "b")}
    tuning = {"a": Tuning(chosen=Point(0.0), chosen_rung=2),
              "b": Tuning(flag="no full-budget tuning trial finished (1 diverged): ...", chosen=Point(0.5),
                          chosen_rung=1)}
    p = plan(["a", "b"], [1, 2])
    a = report.analyse(p, tuning, finals, None)
    assert [report.row_dict(r)["chosen_full_budget"] for r in a.rows] == [True, False]
    assert report.row_dict(report.analyse(p, None, finals, None).rows[0])["chosen_full_budget"] is None  # screening
    _, lines = table(p, a)
    assert "  ! b: no full-budget tuning trial finished (1 diverged): ..." in lines
