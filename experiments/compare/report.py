"""What a comparison reports: one row per option (tuned setting, statistics, verdict, time to target, diverged
share), written as report.md (readable on its own, figures beside it), compare.json (everything, every trial
with the command that reproduces it), compare.csv (the rows) and a rich table on the terminal.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from experiments.compare import figures, stats
from experiments.compare.plan import GRID, ROOT, RUNG_FRACTIONS, Plan, lr_multiplier
from experiments.compare.runs import Curve, Result
from experiments.compare.tuning import Tuning
from trainer.run_dir import git_state


@dataclass
class Row:
    option: str
    baseline: bool
    lr: float | None  # the setting the final runs used
    lr_factor: float | None  # lr / the option's default
    tuned: dict[str, str]  # --tune keys' chosen values
    flag: str
    chosen_full_budget: bool | None  # whether the setting finished a full-budget tuning trial; None: not tuned
    val: stats.Summary
    test: stats.Summary | None
    paired: stats.Paired | None
    p_holm: float
    p_improve: float
    verdict: str
    ttt: stats.TimeToTarget
    speedup_steps: float
    speedup_seconds: float
    diverged_share: float  # of the tuning trials
    failed_share: float
    final_failures: int  # final runs that did not finish
    tuning_steps: int  # charged: every trial's planned length
    steps_run: int  # executed, tuning and final runs
    per_seed: dict[int, float] = field(default_factory=dict)
    per_seed_test: dict[int, float] = field(default_factory=dict)
    hits: dict[int, stats.Hit] = field(default_factory=dict)


@dataclass
class Analysis:
    rows: list[Row]
    target: float | None
    target_source: str
    seconds_source: str  # "time/train_s" or how they were estimated
    curves: dict[str, dict[int, Curve]]


def best_value(curve: Curve, mode: str) -> float | None:
    """The best evaluation: the curve time to target searches. A final metric can be another measurement (the
    char-GPT's whole split against its evaluations' windows), so it stays out."""
    values = [v for v in curve.values if math.isfinite(v)]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def analyse(plan: Plan, tuning: dict[str, Tuning] | None, finals: dict[str, list[Result]],
            target: float | None) -> Analysis:
    metric, mode = plan.metric, plan.mode
    curves = {o: {r.trial.seed: r.curve(metric) for r in rs if r.status == "finished"} for o, rs in finals.items()}
    base = plan.baseline.label
    estimated = any(c.estimated for cs in curves.values() for c in cs.values())
    seconds_source = ("estimated as step x (the run's training time / its steps): metrics.jsonl has no time/train_s"
                      if estimated else "time/train_s of each evaluation (training only)")
    target_source = "--target"
    if target is None:
        bests = [b for c in curves.get(base, {}).values() if (b := best_value(c, mode)) is not None]
        target = stats.median_run(bests, mode)
        target_source = f"the best evaluated {metric} of {base}'s median run" + (
            " (of an even number of runs, the worse middle one)" if len(bests) % 2 == 0 else "")
    values = {o: {r.trial.seed: r.value for r in rs if r.status == "finished"} for o, rs in finals.items()}
    tests = {o: {r.trial.seed: r.final[plan.test_metric] for r in rs
                 if r.status == "finished" and isinstance(r.final.get(plan.test_metric), (int, float))}
             for o, rs in finals.items()}

    paired: dict[str, stats.Paired | None] = {}
    for o in finals:
        if o == base or plan.screen and len(plan.seeds) < 2:
            paired[o] = None
            continue
        seeds = sorted(set(values[o]) & set(values.get(base, {})))
        paired[o] = stats.paired_test([values[o][s] for s in seeds], [values[base][s] for s in seeds])
    others = [o for o in finals if paired.get(o) is not None]
    adjusted = dict(zip(others, stats.holm([paired[o].p for o in others]), strict=True))

    hits = {o: {s: stats.first_hit(c.steps, c.values, c.seconds, target, mode) for s, c in cs.items()}
            if target is not None else {} for o, cs in curves.items()}
    for o, rs in finals.items():  # a run that did not finish missed the target
        for r in rs:
            hits[o].setdefault(r.trial.seed, stats.Hit(math.inf, math.inf))
    ttt = {o: stats.time_to_target(list(h.values())) for o, h in hits.items()}

    rows = []
    for opt in plan.options:
        o = opt.label
        t = tuning.get(o) if tuning else None
        rs = finals.get(o, [])
        used = rs[0].trial if rs else None
        p = paired.get(o)
        p_holm = adjusted.get(o, math.nan)
        verdict = ("baseline" if o == base else "not run" if not rs else
                   "too few finished runs" if p is None or p.n < 2 else stats.verdict(p_holm, p.diff, mode))
        if o != base and rs and plan.screen and len(plan.seeds) < 2:
            verdict = "screening (1 seed)"
        test_values = list(tests.get(o, {}).values())
        steps_run = sum(int(r.final.get("step", 0)) for r in rs)
        if t:
            steps_run += sum(int(getattr(out, "final", {}).get("step", 0)) for out in t.trials.values())
        rows.append(Row(
            option=o, baseline=o == base, lr=used.lr if used else None,
            lr_factor=(lr_multiplier(t.chosen.k) if t and t.chosen else None if t else 1.0),
            tuned=dict(t.chosen.extra) if t and t.chosen else {}, flag=t.flag if t else "",
            chosen_full_budget=t.chosen_rung == len(plan.rungs) - 1 if t and t.chosen else None,
            val=stats.describe(list(values.get(o, {}).values())),
            test=stats.describe(test_values) if test_values else None, paired=p, p_holm=p_holm,
            p_improve=(stats.prob_improvement(list(values[o].values()), list(values[base].values()), mode)
                       if o != base and values.get(o) and values.get(base) else math.nan),
            verdict=verdict, ttt=ttt.get(o, stats.time_to_target([])),
            speedup_steps=stats.speedup(ttt[base].median_step, ttt[o].median_step) if o in ttt and base in ttt
            else math.nan,
            speedup_seconds=stats.speedup(ttt[base].median_seconds, ttt[o].median_seconds)
            if o in ttt and base in ttt else math.nan,
            diverged_share=t.diverged_share() if t else 0.0, failed_share=t.failed_share() if t else 0.0,
            final_failures=sum(r.status != "finished" for r in rs), tuning_steps=plan.tuning_steps(),
            steps_run=steps_run, per_seed=values.get(o, {}), per_seed_test=tests.get(o, {}),
            hits=hits.get(o, {})))
    return Analysis(rows, target, target_source, seconds_source, curves)


# -- formatting --------------------------------------------------------------------------------------------------
def num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "never" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def interval(s: stats.Summary | None) -> str:
    if s is None or s.n == 0:
        return "-"
    if s.n == 1:
        return num(s.mean, 5)
    return f"{num(s.mean, 5)} ± {num(s.std, 2)} [{num(s.low, 5)}, {num(s.high, 5)}]"


def diff_text(p: stats.Paired | None) -> str:
    if p is None or p.n == 0:
        return "-"
    if p.n < 2:
        return num(p.diff, 3)
    return f"{p.diff:+.3g} [{p.low:+.3g}, {p.high:+.3g}]"


def ttt_text(t: stats.TimeToTarget) -> tuple[str, str, str]:
    steps = num(t.median_step, 5)
    secs = "never" if math.isinf(t.median_seconds) else f"{t.median_seconds:.1f} s"
    return steps, secs, f"{t.hits}/{t.runs}"


def setting_text(r: Row) -> str:
    if r.lr is None:
        return "-"
    text = f"{r.lr:.3g}" + (f" ({r.lr_factor:.3g}x)" if r.lr_factor not in (None, 1.0) else "")
    return text + "".join(f" {k}={v}" for k, v in r.tuned.items())


def _verdict_style(v: str) -> str:
    return {"better": "green", "worse": "red", "baseline": "bold"}.get(v, "")


def speedup_text(r: Row) -> str:
    """In steps (exact: the same evaluation steps for every option), then in training seconds (this machine)."""
    if r.baseline or math.isnan(r.speedup_steps):
        return "-"
    if r.speedup_steps == 0:  # its median run never reached the target ("0x" read like a number)
        return "never (median)"
    return f"{num(r.speedup_steps, 3)}x ({num(r.speedup_seconds, 3)}x time)"


def print_table(plan: Plan, a: Analysis, console: Console) -> None:
    title = (f"{'SCREENING (defaults, no tuning): ' if plan.screen else ''}{plan.axis} on "
             f"{plan.baseline.cfg.task._target_.split('.')[-1]}: final {plan.metric} ({plan.mode}) over "
             f"{len(plan.seeds)} seed{'s' * (len(plan.seeds) > 1)}")
    caption = (f"target {plan.metric} {'<=' if plan.mode == 'min' else '>='} {num(a.target, 5)} "
               f"({a.target_source})" if a.target is not None else "no target")
    table = Table(title=title, caption=caption)
    has_test = any(r.test for r in a.rows)
    cols = ["option", "lr (x default)", f"{plan.metric}", "95% CI", *([plan.test_metric] if has_test else []),
            "Δ [95% CI]", "p Holm", "P(better)", "verdict", "to target", "time", "hit", "speed-up", "diverged"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("option", "verdict", "lr (x default)") else "right")
    for r in a.rows:
        steps, secs, hit = ttt_text(r.ttt)
        ci = "-" if r.val.n < 2 else f"[{num(r.val.low, 5)}, {num(r.val.high, 5)}]"
        mean = "-" if r.val.n == 0 else num(r.val.mean, 5) + (f" ± {num(r.val.std, 2)}" if r.val.n > 1 else "")
        cells = [r.option + (" (base)" if r.baseline else ""), setting_text(r) + (" !" if r.flag else ""), mean, ci,
                 *([interval(r.test).split(" [")[0]] if has_test else []), diff_text(r.paired), num(r.p_holm, 2),
                 num(r.p_improve, 2),
                 f"[{_verdict_style(r.verdict)}]{r.verdict}[/]" if _verdict_style(r.verdict) else r.verdict,
                 steps, secs, hit, speedup_text(r), f"{r.diverged_share:.0%}"]
        table.add_row(*cells)
    console.print(table)
    for r in a.rows:
        if r.flag:
            console.print(f"  ! {r.option}: {r.flag}", highlight=False)


# -- files -------------------------------------------------------------------------------------------------------
def row_dict(r: Row) -> dict[str, Any]:
    d = {
        "option": r.option, "baseline": r.baseline, "lr": r.lr, "lr_factor": r.lr_factor, **{
            f"tuned/{k}": v for k, v in r.tuned.items()}, "flag": r.flag, "chosen_full_budget": r.chosen_full_budget,
        "val_n": r.val.n, "val_mean": r.val.mean, "val_std": r.val.std, "val_ci_low": r.val.low,
        "val_ci_high": r.val.high,
        "test_mean": r.test.mean if r.test else None, "test_std": r.test.std if r.test else None,
        "test_ci_low": r.test.low if r.test else None, "test_ci_high": r.test.high if r.test else None,
        "diff_mean": r.paired.diff if r.paired else None, "diff_ci_low": r.paired.low if r.paired else None,
        "diff_ci_high": r.paired.high if r.paired else None, "p": r.paired.p if r.paired else None,
        "p_holm": r.p_holm, "p_improve": r.p_improve, "verdict": r.verdict,
        "ttt_median_steps": r.ttt.median_step, "ttt_median_seconds": r.ttt.median_seconds,
        "ttt_hit_rate": r.ttt.hit_rate, "speedup_steps": r.speedup_steps, "speedup_seconds": r.speedup_seconds,
        "diverged_share": r.diverged_share, "failed_share": r.failed_share, "final_failures": r.final_failures,
        "tuning_steps": r.tuning_steps, "steps_run": r.steps_run,
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else ("inf" if obj == math.inf else "-inf" if obj == -math.inf else obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def trial_dict(r: Result, threads: int) -> dict[str, Any]:
    t = r.trial
    return {"option": t.option, "phase": t.phase, "seed": t.seed, "steps": t.steps, "lr": t.lr,
            "tuned": dict(t.point.extra) if t.point is not None else {}, "status": r.status, "value": r.value,
            "error": r.error, "cached": r.cached, "run_dir": str(t.run_dir), "command": t.command(threads)}


def write(out: Path, plan: Plan, a: Analysis, tuning: dict[str, Tuning] | None, finals: dict[str, list[Result]],
          *, jobs: int, threads: int, wall_s: float, ran: int, cached: int, console: Console) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figs = figures.draw(out, plan, a, tuning, finals)
    git = git_state(ROOT)
    trials = [r for t in (tuning or {}).values() for r in t.trials.values()] + [r for rs in finals.values()
                                                                                  for r in rs]
    meta = {
        "command": " ".join(plan.command), "date": datetime.now().isoformat(timespec="seconds"), "git": git,
        "shared_config_hash": plan.shared_hash(), "axis": plan.axis, "options": [o.label for o in plan.options],
        "baseline": plan.baseline.label, "screen": plan.screen, "metric": plan.metric, "mode": plan.mode,
        "test_metric": plan.test_metric, "budget_steps": plan.budget, "steps_per_epoch": plan.steps_per_epoch,
        "eval_every": plan.eval_every, "rungs": list(plan.rungs), "rung_sizes": list(plan.rung_sizes),
        "grid_half_decades": list(GRID), "seeds": plan.seeds, "tuning_seed": plan.tuning_seed,
        "tune": {k: v for k, v in plan.tune}, "jobs": jobs, "threads_per_job": threads,
        "target": a.target, "target_source": a.target_source, "seconds_source": a.seconds_source,
        "wall_s": round(wall_s, 1), "trials_run": ran, "trials_cached": cached, "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    rows = [row_dict(r) for r in a.rows]
    doc = {**meta, "rows": rows, "per_seed": {r.option: r.per_seed for r in a.rows},
           "trials": [trial_dict(r, threads) for r in trials], "figures": figs}
    (out / "compare.json").write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "report.md").write_text(markdown(plan, a, tuning, finals, meta, figs, threads))


def markdown(plan: Plan, a: Analysis, tuning: dict[str, Tuning] | None, finals: dict[str, list[Result]],
             meta: dict[str, Any], figs: dict[str, str], threads: int) -> str:
    m, mode = plan.metric, plan.mode
    task = plan.baseline.cfg.task._target_
    opts = ", ".join(o.label for o in plan.options)
    lines = [f"# {plan.axis}: {opts}", ""]
    if plan.screen:
        lines += ["**SCREENING**: every option at its default settings, no tuning"
                  + (", one seed: no statistics, no verdict." if len(plan.seeds) < 2 else "."), ""]
    git = meta["git"]
    has_test = any(plan.test_metric in r.final for rs in finals.values() for r in rs)
    test_words = (f"`{plan.test_metric}` is reported at the end only, never used to choose" if has_test else
                  "the task scores no test set")
    n = len(plan.seeds)
    lines += [
        f"Task `{task}`, selection and time to target on `{m}` ({mode}); {test_words}.", "",
        f"- command: `{meta['command']}`",
        f"- git: {git.get('commit') or 'unknown (not run from a git checkout)'}"
        f"{' (dirty working tree)' if git.get('dirty') else ''}; "
        f"shared config hash `{meta['shared_config_hash']}` (the baseline's composed config without the axis, "
        "seed, budget and tuned keys)",
        f"- {meta['date']}, {meta['host']} ({meta['cpus']} CPUs), {meta['jobs']} job(s) x {threads} thread(s); "
        f"{meta['trials_run']} trials run, {meta['trials_cached']} read from the ledger; {meta['wall_s']:.0f} s",
        "", "## Protocol", "",
        f"- budget: a full run is {plan.length()} (optimizer steps); evaluation every {plan.eval_every} steps for "
        "every run of every option",
    ]
    if not plan.screen:
        rungs = ", ".join(f"{n} x {s} steps" for n, s in zip(plan.rung_sizes, plan.rungs, strict=True))
        lines += [
            f"- tuning: `optimizer.lr` on {len(GRID)} points, 10^-2 .. 10^2 x each option's own default (half "
            "decades)" + "".join(f", x `{k}` in {{{', '.join(v)}}}" for k, v in plan.tune)
            + f"; 2 more points after the grid ran (past an edge when the best was on it, else a quarter decade "
            f"either side of the best); successive halving (eta 3), rungs at "
            f"{', '.join(f'{f:.3g}' for f in RUNG_FRACTIONS)} of the budget: {rungs}. Every rung trial is a "
            f"complete run of its length. Every option spends {plan.tuning_steps()} tuning steps, pruned and "
            f"diverged trials included; seed {plan.tuning_seed}.",
        ]
    lines += [
        f"- final runs: the chosen setting of each option with seeds {', '.join(map(str, plan.seeds))} (fresh, "
        "paired: seed k gives every option the same initial weights where the models are identical, and the same "
        "data order)",
        f"- statistics: mean, std and 95% t-interval over seeds; paired t-test against "
        f"`{plan.baseline.label}` over seeds (Wilcoxon's signed-rank test could not go below p = {2 / 2 ** n:.3g} "
        f"with {n} pairs), Holm-corrected across options; P(better) is the probability that a random run of the "
        "option beats one of the baseline (Mann-Whitney U / nm); verdict at alpha = 0.05",
        f"- time to target: the first evaluated step at which `{m}` reaches {num(a.target, 5)} ({a.target_source}); "
        f"seconds: {a.seconds_source}; a miss counts as never. The speed-up over the baseline is the ratio of "
        "median steps (exact), then of median training seconds (as this machine measured them, its load included)",
        "", "## Results", "",
    ]
    head = ["option", "lr (x default)", f"{m} mean ± std [95% CI]", f"{plan.test_metric} mean ± std",
            "Δ vs baseline [95% CI]", "p (Holm)", "P(better)", "verdict", "median steps to target",
            "median time to target", "hit rate", "speed-up", "diverged (tuning)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in a.rows:
        steps, secs, hit = ttt_text(r.ttt)
        lines.append("| " + " | ".join([
            f"**{r.option}** (baseline)" if r.baseline else r.option, setting_text(r) + (" ⚑" if r.flag else ""),
            interval(r.val), interval(r.test).split(" [")[0], diff_text(r.paired), num(r.p_holm, 2),
            num(r.p_improve, 2), r.verdict, steps, secs, hit,
            speedup_text(r), f"{r.diverged_share:.0%}"]) + " |")
    flags = [f"- ⚑ {r.option}: {r.flag}" for r in a.rows if r.flag]
    failures = [f"- {r.option}: {r.final_failures} of {len(plan.seeds)} final runs did not finish (see the runs)"
                for r in a.rows if r.final_failures]
    if a.target is None:
        failures.append(f"- no target: the baseline has no finished final run with an evaluation of `{m}`")
    elif all(r.ttt.hits == 0 for r in a.rows):
        failures.append(f"- no run reached the target {num(a.target, 5)}")
    lines += ["", *flags, *failures, "", "## Figures", ""]
    captions = {
        "learning_curves": f"Validation `{m}` against optimizer steps: mean over seeds (line) and its min-max band.",
        "lr_sensitivity": f"Final `{m}` of every rung-0 trial (1/9 of the budget) against its learning rate; "
                          "crosses at the top: diverged or failed; a star marks the chosen setting.",
        "final_per_seed": f"Final `{m}` of each final run; lines join the runs of one seed across options "
                          "(the pairs the test compares).",
        "time_to_target": "Share of each option's final runs that reached the target against training seconds.",
    }
    for name, path in figs.items():
        lines += [f"![{name}]({path})", "", captions.get(name, ""), ""]
    if tuning:
        lines += ["## Tuning", "", f"Final `{m}` of each trial by rung (· = not promoted).", ""]
        for opt in plan.options:
            t = tuning[opt.label]
            points = sorted({p for (_, p) in t.trials})
            lines += [f"**{opt.label}** (default lr {opt.default_lr:.3g}){': ' + t.flag if t.flag else ''}", "",
                      "| lr | " + " | ".join(f"rung {i} ({s} steps)" for i, s in enumerate(plan.rungs)) + " |",
                      "|---|" + "---|" * len(plan.rungs)]
            for p in points:
                cells = []
                for rung in range(len(plan.rungs)):
                    res = t.trials.get((rung, p))
                    cells.append("·" if res is None else num(res.value, 5) if res.status == "finished"
                                 else res.status)
                lr = opt.default_lr * lr_multiplier(p.k)
                star = " ★" if p == t.chosen else ""
                lines.append(f"| {lr:.3g}{''.join(f' {k}={v}' for k, v in p.extra)}{star} | "
                             + " | ".join(cells) + " |")
            lines += [""]
    lines += ["## Final runs", "", "Each command reproduces its run exactly (CPU; the thread count changes the "
              "float rounding). Every tuning trial's command is in compare.json.", "",
              f"| option | seed | {m} | {plan.test_metric} | steps to target | run directory | command |",
              "|---|---|---|---|---|---|---|"]
    for opt in plan.options:
        for r in finals.get(opt.label, []):
            s = r.trial.seed
            hit = a.rows[[x.option for x in a.rows].index(opt.label)].hits.get(s)
            lines.append(f"| {opt.label} | {s} | {num(r.value, 6) if r.status == 'finished' else r.status} | "
                         f"{num(r.final.get(plan.test_metric), 6)} | {num(hit.step, 6) if hit else '-'} | "
                         f"`{r.trial.run_dir}` | `{r.trial.command(threads)}` |")
    return "\n".join(lines) + "\n"
