"""`python -m experiments.compare`: is option A better than B on this task, and by how much?

    python -m experiments.compare optimizer=adamw,lion,lamb,sgd task=mnist_vae trainer.max_epochs=3
    python -m experiments.compare norm=none,batchnorm,layernorm,rmsnorm recipe=mnist_cnn --seeds 5
    python -m experiments.compare schedule=cosine_warmup,wsd,sgdr recipe=char_transformer_cpu --target 1.95 --jobs 2
    python -m experiments.compare optimizer=adamw,lion ... --dry-run    # the plan and its estimated cost
    python -m experiments.compare optimizer=adamw,lion ... --screen     # defaults only, one seed: screening

The steps: plan (plan.py: parse, compose and validate every option) -> tune each option's learning rate with an
equal budget (tuning.py) -> run the chosen settings with paired seeds -> statistics (stats.py) -> report.md,
figures, compare.json/.csv and a table (report.py, figures.py). Trials run through the sweep ledger (runs.py), so
running the same command again after Ctrl-C runs only what is missing. Exit codes: 0 done, 2 bad input,
130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape

from core.batches import usable_cores
from core.errors import ConfigError, UserError
from core.log import print_error
from experiments.compare import probe as probing
from experiments.compare import report
from experiments.compare.plan import GRID, PER_TRIAL, ROOT, Plan, build_plan, format_lr, lr_multiplier
from experiments.compare.runs import Interrupted, Result, Runner, WorkerDied, make_trial
from experiments.compare.tuning import Point, Tuning, tune


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any config group or key can be the axis (regularize.dropout=0,0.1). "
                                            "See the README's Compare section.")
    parser.add_argument("items", nargs="*", metavar="axis=a,b,... | key=value",
                        help="the compared axis (one argument with commas) and overrides applied to every run")
    parser.add_argument("--seeds", type=int, help="final runs per option, paired across options (default 5; "
                                                  "1 with --screen)")
    parser.add_argument("--baseline", help="the option the others are tested against (default: the first)")
    parser.add_argument("--target", type=float, help="the validation value time to target is measured at "
                                                     "(default: the baseline's median best)")
    parser.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2",
                        help="another key tuned with the LR for every option (repeatable)")
    parser.add_argument("--screen", action="store_true", help="defaults only, no tuning: a screening, labelled so")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="trials in parallel (local processes; the cores are "
                                                            "divided among them)")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per full run (default 10; "
                                                              "trainer.eval_interval=... sets it directly)")
    parser.add_argument("--out", type=Path, help="where the report goes (default: runs/compare/<axis and "
                                                 "options>-<hash of the command>)")
    parser.add_argument("--trials", type=Path, help="the sweep directory of the trials (default: <out>/trials); "
                                                    "comparisons sharing it share identical trials")
    return parser.parse_args(argv)


RECORD = "comparison.json"  # in --out: the comparison the folder belongs to
REPORT_FILES = ("report.md", "compare.json", "compare.csv", RECORD)  # and the figures (*.png)
PREVIOUS = "previous_comparison_"  # <out>/previous_comparison_<n>/: an earlier comparison's report, moved aside


def spec(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that makes the comparison, its trials and its report: options with their composed configs,
    overrides, budget, seeds, protocol, tuning, baseline, target. Not how it runs (--jobs, --trials)."""

    def digest(cfg: Any) -> str:  # the option's composed config, without what the protocol sets (listed below)
        data = OmegaConf.to_container(cfg, resolve=False)
        for key in PER_TRIAL:
            group, leaf = key.split(".")
            if isinstance(data.get(group), dict):
                data[group].pop(leaf, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    made = {"axis": plan.axis, "configs": {o.label: digest(o.cfg) for o in plan.options},
            "default_lrs": {o.label: o.default_lr for o in plan.options}, "baseline": plan.baseline.label,
            "overrides": sorted(a for a in plan.shared if "=" in a), "budget": plan.budget, "seeds": plan.seeds,
            "tuning_seed": plan.tuning_seed, "lr": plan.user_lr, "screen": plan.screen, "tune": plan.tune,
            "protocol": plan.protocol, "eval_every": plan.eval_every, "target": args.target}
    return json.loads(json.dumps(made))  # as it reads back from comparison.json


def spec_hash(s: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]


def default_out(plan: Plan, args: argparse.Namespace) -> Path:
    name = f"{plan.axis}={','.join(o.label for o in plan.options)}"
    name = "".join(c if c.isalnum() or c in "._=,+-" else "_" for c in name)[:100]
    return ROOT / "runs" / "compare" / f"{name}-{spec_hash(spec(plan, args))}"


def folder_problem(flag: str, path: Path) -> str | None:
    """Why `path` cannot be (or become) a folder we write in; None when it can."""
    path = path.absolute()
    there = next(p for p in (path, *path.parents) if p.exists())
    if not there.is_dir():
        return f"{flag} {path}: {there} is a file, not a folder; give a folder"
    if not os.access(there, os.W_OK | os.X_OK):
        return f"{flag} {path}: {there} is not writable; give a folder you can write in"
    return None


def earlier_comparison(out: Path, mine: dict[str, Any]) -> tuple[list[Path], str]:
    """A folder holds one comparison: the files of another comparison in `out` (to move aside) and how it differs;
    nothing when `out` is new or this comparison's (running it again resumes it). Its trials stay: the ledger keys
    them by config, so another comparison reuses only identical ones. Files no comparison wrote are refused."""
    if not out.is_dir():
        return [], ""
    try:
        theirs = json.loads((out / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        theirs = {}
    if theirs.get("spec") == mine:
        return [], ""
    files = [p for p in sorted(out.iterdir()) if p.name in REPORT_FILES or p.suffix == ".png"]
    foreign = [p.name for p in sorted(out.iterdir())
               if p not in files and p.name != "trials" and not p.name.startswith(PREVIOUS)]
    if foreign:
        raise ConfigError(f"--out {out} holds files that are not a comparison's ({', '.join(foreign[:5])}); give "
                          "another --out (without --out, the default name is the comparison's own)")
    old = theirs.get("spec") or {}
    differ = sorted(k for k in {*old, *mine} if old.get(k) != mine.get(k))
    return files, (f"`{shlex.join(theirs.get('command') or [])}`, which differs in {', '.join(differ)}" if old
                   else "one from before comparisons recorded their settings")


def move_aside(out: Path, files: list[Path]) -> Path:
    dest = next(out / f"{PREVIOUS}{i}" for i in itertools.count(1) if not (out / f"{PREVIOUS}{i}").exists())
    dest.mkdir()
    for f in files:
        f.rename(dest / f.name)
    return dest


def describe(plan: Plan, console: Console, out: Path, jobs: int, threads: int) -> None:
    """The plan, printed by --dry-run and at the start of a comparison."""
    kind = "SCREENING (each option's defaults, no tuning)" if plan.screen else "tuned comparison"
    console.print(f"[bold]compare {plan.axis}[/]: {', '.join(o.label for o in plan.options)} "
                  f"(baseline {plan.baseline.label}); {kind}", highlight=False)
    console.print(f"  selection and time to target on {plan.metric} ({plan.mode}); {plan.test_metric} reported "
                  f"at the end only", highlight=False)
    console.print(f"  full run: {plan.length()}, evaluation every {plan.eval_every} steps", highlight=False)
    if not plan.screen:
        rungs = ", ".join(f"{n} x {s}" for n, s in zip(plan.rung_sizes, plan.rungs, strict=True))
        console.print(f"  tuning: optimizer.lr on {len(GRID)} points, {lr_multiplier(GRID[0]):g}x .. "
                      f"{lr_multiplier(GRID[-1]):g}x each option's default (+2 after the grid ran), x "
                      + (" x ".join(f"{k} {{{','.join(v)}}}" for k, v in plan.tune) or "nothing else")
                      + f"; successive halving, rungs (trials x steps): {rungs} = {plan.tuning_steps()} steps "
                      "per option", highlight=False)
        for o in plan.options:
            console.print(f"    {o.label}: default lr {format_lr(o.default_lr)}, grid "
                          f"{format_lr(o.default_lr * lr_multiplier(GRID[0]))} .. "
                          f"{format_lr(o.default_lr * lr_multiplier(GRID[-1]))}", highlight=False)
    per_option = plan.tuning_steps() + len(plan.seeds) * plan.budget
    n_trials = (0 if plan.screen else sum(plan.rung_sizes)) + len(plan.seeds)
    console.print(f"  final runs: seeds {', '.join(map(str, plan.seeds))} x {plan.budget} steps per option",
                  highlight=False)
    console.print(f"  total: {len(plan.options)} options x {n_trials} runs = {len(plan.options) * n_trials} runs, "
                  f"{len(plan.options) * per_option:,} steps; {jobs} job(s) x {threads} thread(s); out {out}",
                  highlight=False)


def estimate(plan: Plan, console: Console, jobs: int, threads: int) -> float:
    console.print(f"timing probe ({probing.SHORT} and {probing.LONG} steps per option, {threads} thread(s)) ...",
                  highlight=False)
    total = 0.0
    for o in plan.options:
        t = probing.probe(plan, o, threads)
        seconds = probing.option_seconds(plan, t)
        total += seconds
        console.print(f"  {o.label}: {t.fixed_s:.2f} s per run + {t.step_s * 1e3:.2f} ms per step + "
                      f"{t.eval_s:.2f} s per evaluation -> {seconds / 60:.1f} min of runs", highlight=False)
    wall = total / jobs + probing.worker_start_s()
    console.print(f"[bold]estimate: {wall / 60:.1f} min[/] with {jobs} job(s) (assumes they don't slow each other "
                  "down and the machine's load stays as it was; finished trials in the ledger are not run again)",
                  highlight=False)
    return wall


def run(plan: Plan, runner: Runner, trials_dir: Path) -> tuple[dict[str, Tuning] | None, dict[str, list[Result]]]:
    options = {o.label: o for o in plan.options}
    tuning = None
    if not plan.screen:
        labels = iter(["tuning, rung 0: the grid", "tuning, rung 0: 2 more points per option", "tuning, rung 1",
                       "tuning, rung 2"])

        def run_batch(batch: list[tuple[str, int, Point]]) -> list[Result]:
            trials = [make_trial(plan, options[o], trials_dir, f"r{rung}", plan.rungs[rung], plan.tuning_seed, p)
                      for o, rung, p in batch]
            return runner.run(trials, next(labels))

        tuning = tune(list(options), plan.rung_sizes, plan.mode, plan.tune, run_batch)
    trials = []
    for o in plan.options:
        point = tuning[o.label].chosen if tuning else None
        if tuning and point is None:
            continue  # every trial failed: nothing to run
        trials += [make_trial(plan, o, trials_dir, "seed", plan.budget, s, point) for s in plan.seeds]
    results = runner.run(trials, "final runs (paired seeds)")
    finals: dict[str, list[Result]] = {o.label: [] for o in plan.options}
    for r in results:
        finals[r.trial.option].append(r)
    return tuning, finals


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    if args.seeds is None:
        args.seeds = 1 if args.screen else 5
    bad = [f"--jobs {args.jobs}: must be at least 1"] * (args.jobs < 1)
    bad += [f"--evals {args.evals}: must be at least 1 (evaluations per full run)"] * (args.evals < 1)
    if args.target is not None and not math.isfinite(args.target):
        bad.append(f"--target {args.target}: must be a finite number (the value time to target is measured at)")
    bad += [p for flag in ("--out", "--trials") if (path := getattr(args, flag[2:])) and
            (p := folder_problem(flag, path))]
    if bad:
        print_error("\n".join(bad))
        return 2
    cores = usable_cores()
    threads = max(1, cores // args.jobs)
    command = ["python", "-m", "experiments.compare", *argv]
    try:
        plan = build_plan(args.items, seeds=args.seeds, screen=args.screen, baseline=args.baseline, tune=args.tune,
                          evals=args.evals, command=command)
        out = args.out or default_out(plan, args)
        trials_dir = args.trials or out / "trials"
        mine = spec(plan, args)
        if p := folder_problem("--out", out):  # the default one
            raise ConfigError(p)
        earlier, differs = earlier_comparison(out, mine)
        describe(plan, console, out, args.jobs, threads)
        if earlier:
            console.print(escape(f"  --out {out} holds another comparison ({differs}): its report "
                                 f"{'would move' if args.dry_run else 'moves'} to {out}/{PREVIOUS}<n>/; its trials "
                                 "stay (identical ones are reused)"), highlight=False)
        if args.dry_run:
            estimate(plan, console, args.jobs, threads)
            return 0
    except UserError as e:
        print_error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return 130

    out.mkdir(parents=True, exist_ok=True)
    if earlier:
        console.print(f"moved the earlier comparison's report to {move_aside(out, earlier)}", highlight=False)
    (out / RECORD).write_text(json.dumps({"command": command, "spec": mine}, indent=2) + "\n")
    runner = Runner(trials_dir, args.jobs, threads, plan.metric, console)
    previous = signal.signal(signal.SIGTERM, _stop)
    start = time.perf_counter()
    try:
        tuning, finals = run(plan, runner, trials_dir)
    except (Interrupted, KeyboardInterrupt) as stopped:
        runner.close()
        done = sum(e["status"] == "finished" for e in runner.ledger.entries().values())
        what = str(stopped) if isinstance(stopped, WorkerDied) else "interrupted."
        print_error(f"{what} {done} trials are finished in {runner.ledger.path}; a trial that was "
                    "running starts again from the beginning. Continue with the same command:\n  "
                    + shlex.join(command))
        return getattr(stopped, "exit_code", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    runner.close()
    wall = time.perf_counter() - start
    analysis = report.analyse(plan, tuning, finals, args.target)
    report.write(out, plan, analysis, tuning, finals, jobs=args.jobs, threads=threads, wall_s=wall, ran=runner.ran,
                 cached=runner.cached, console=console)
    report.print_table(plan, analysis, console)
    console.print(f"report: {out / 'report.md'} (compare.json, compare.csv and figures beside it); "
                  f"{runner.ran} trials run, {runner.cached} read from the ledger, {wall / 60:.1f} min",
                  highlight=False)
    return 0
