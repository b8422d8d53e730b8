"""--dry-run's cost estimate: a short timing probe of each option, in this process, then arithmetic.

The probe runs each option's trial twice, as a worker would run it (validation, data, model, run directory, logs,
checkpoint, the final evaluation and test set), for 10 and for 50 steps with the threads a worker will have, and
times one evaluation on its own. The difference gives the time of a step, the rest the fixed cost of a run. A trial
then costs about fixed + steps x step + (evaluations - 1) x evaluation, and the whole comparison the sum over its
trials divided by --jobs, plus the start of the worker processes. It assumes the workers do not slow each other
down and the machine's load stays what it was during the probe.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import open_dict

from config import validate
from experiments.compare.plan import ROOT, Option, Plan
from experiments.compare.runs import output_to, thread_count
from trainer.build import build
from trainer.run import run

SHORT, LONG = 10, 50


@dataclass(frozen=True)
class Timing:
    fixed_s: float  # what every run pays whatever its length: setup, files, one evaluation, the test set
    step_s: float
    eval_s: float


def probe(plan: Plan, option: Option, threads: int) -> Timing:

    def config(steps: int):
        cfg = plan.config(option, plan.overrides(option, steps, plan.tuning_seed, None if plan.screen else 0.0))
        with open_dict(cfg):  # one evaluation, at the end (early stopping and plateau schedules want one)
            cfg.trainer.update(eval_interval=steps, progress="off", pictures=False, checkpoint_interval=0,
                               histogram_interval=0)
        return cfg

    with thread_count(threads), tempfile.TemporaryDirectory() as tmp, output_to(Path("/dev/null")):
        validate(config(SHORT))
        parts = build(config(SHORT))
        parts.model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            parts.task.evaluate(parts.model)
            eval_s = time.perf_counter() - start
        seconds = {}
        for steps in (SHORT, LONG):
            start = time.perf_counter()
            run(config(steps), Path(tmp) / str(steps))
            seconds[steps] = time.perf_counter() - start
    step_s = max(seconds[LONG] - seconds[SHORT], 0.0) / (LONG - SHORT)
    return Timing(max(seconds[SHORT] - SHORT * step_s, 0.0), step_s, eval_s)


def worker_start_s() -> float:
    """Seconds a fresh worker process takes to import what a trial needs."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import experiments.sweep, trainer.run, config"], cwd=ROOT,
                   capture_output=True, check=False)
    return time.perf_counter() - start


def trial_seconds(t: Timing, steps: int, eval_every: int) -> float:
    evals = steps // eval_every + (1 if steps % eval_every else 0)  # the last step is always evaluated, once
    return t.fixed_s + steps * t.step_s + max(0, evals - 1) * t.eval_s


def option_seconds(plan: Plan, t: Timing) -> float:
    total = 0.0
    if not plan.screen:
        total += sum(n * trial_seconds(t, s, plan.eval_every) for n, s in zip(plan.rung_sizes, plan.rungs,
                                                                              strict=True))
    return total + len(plan.seeds) * trial_seconds(t, plan.budget, plan.eval_every)
