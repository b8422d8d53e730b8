"""Running a comparison's trials through the sweep ledger: cached, resumable, in parallel worker processes.

Every trial is an ordinary run directory keyed by the sweep ledger (cached, resumable), run through
`experiments.sweep.run_job` in worker processes (why: DESIGN.md).

Ctrl-C: the run in progress finishes its step, or its final phase's current part, and is recorded as interrupted
(it runs again from the start next time), then Interrupted is raised. Workers run in their own session, so the
terminal's SIGINT reaches only compare, which sends each busy worker one SIGINT, reads its answer and tells it to
exit (a second Ctrl-C sends a second SIGINT: the runs stop at once). A worker that dies without answering (SIGKILL,
out of memory, a crash) raises WorkerDied, which names the trial and how it died; its trial is recorded as
interrupted and runs again next time.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shlex
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from core.errors import UserError
from experiments.compare.plan import Option, Plan
from experiments.sweep import Ledger, job_key, key_hash, run_job
from trainer.device import set_threads
from trainer.run import main as run_main


@contextlib.contextmanager
def thread_count(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to n for the duration of the block (None: left as it is)."""
    previous = set_threads(n)
    try:
        yield
    finally:
        set_threads(previous)


class Interrupted(UserError):
    """Ctrl-C or SIGTERM during a comparison: finished trials are in the ledger."""

    exit_code = 130


class WorkerDied(Interrupted):
    """A worker process ended without answering (killed, out of memory, crashed): the comparison stops; the trial it
    ran is recorded in the ledger as interrupted and runs again next time."""

    exit_code = 1


@dataclass
class Trial:
    option: str
    phase: str  # "r0", "r1", "r2" (tuning rungs) or "seed"
    steps: int
    seed: int
    overrides: list[str]  # the train.py command line
    cfg: DictConfig
    key: str  # the ledger's key
    run_dir: Path
    point: Any = None  # tuning.Point for tuning trials
    lr: float | None = None

    def command(self, threads: int) -> str:
        """The command that reproduces this trial: with the threads it ran with (trial.json), else `threads`."""
        with contextlib.suppress(OSError, json.JSONDecodeError, KeyError):
            return json.loads((self.run_dir / "trial.json").read_text())["command"]
        return command(self.overrides, threads)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "x"


def make_trial(plan: Plan, option: Option, trials_dir: Path, phase: str, steps: int, seed: int,
               point: Any = None) -> Trial:
    overrides = plan.overrides(option, steps, seed, point.k if point else None, point.extra if point else ())
    cfg = plan.config(option, overrides)
    task_overrides = [o for o in overrides if not o.startswith("hydra.")]  # what a Hydra job's key leaves out
    key = job_key(task_overrides, cfg)
    lr = cfg.optimizer.get("lr") if "optimizer" in cfg else None
    name = f"{_slug(option.label)}-{phase}"
    if phase == "seed":
        name += f"{seed}"
    elif isinstance(lr, (int, float)):
        extra = point.extra if point else ()
        name += f"-lr{lr:.3g}" + "".join(f"-{_slug(k.split('.')[-1])}{_slug(v)}" for k, v in extra)
    return Trial(option.label, phase, steps, seed, overrides, cfg, key, trials_dir / f"{name}-{key_hash(key)}",
                 point, float(lr) if isinstance(lr, (int, float)) else None)


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training seconds at each evaluation
    estimated: bool = False  # seconds estimated from the step (metrics.jsonl had no time/train_s)


@dataclass
class Result:
    trial: Trial
    status: str  # finished | diverged | failed | interrupted
    value: float | None  # the final monitored validation metric
    final: dict[str, Any]
    error: str
    cached: bool

    def curve(self, metric: str) -> Curve:
        """The run's evaluations of `metric`: step, value and training seconds (evaluation excluded)."""
        curve = Curve()
        path = self.trial.run_dir / "metrics.jsonl"
        rows = []
        if path.is_file():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(line))
        total = self.final.get("train_time_s") or self.final.get("wall_time_s")
        last = self.final.get("step") or self.trial.steps
        for row in rows:
            v = row.get(f"eval/{metric}")
            if not isinstance(v, (int, float)):
                continue
            t = row.get("time/train_s")
            if not isinstance(t, (int, float)):
                curve.estimated = True
                t = row["step"] / last * total if total else math.nan
            curve.steps.append(int(row["step"]))
            curve.values.append(float(v))
            curve.seconds.append(float(t))
        return curve


def _diverged(error: str) -> bool:
    """A run stopped by a non-finite loss (trainer.nonfinite.NonFiniteError): a result of its setting."""
    return "NonFinite" in error or "non-finite" in error


def read_result(trial: Trial, ledger: Ledger, metric: str, cached: bool) -> Result:
    """How a trial ended, from the ledger and its run directory."""
    entry = ledger.entries().get(trial.key)
    if entry is None or entry["status"] == "running":
        return Result(trial, "interrupted", None, {}, "did not end", cached)
    error = entry.get("error") or ""
    if entry["status"] == "failed":
        return Result(trial, "diverged" if _diverged(error) else "failed", None, {}, error, cached)
    if entry["status"] != "finished":
        return Result(trial, entry["status"], None, {}, error, cached)
    try:
        final = json.loads((trial.run_dir / "final_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        final = entry.get("final") or {}
    value = final.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or "non-finite" in str(
            final.get("stop_reason", "")):
        return Result(trial, "diverged", None, final, f"{metric} = {value} ({final.get('stop_reason', '')})", cached)
    return Result(trial, "finished", float(value), final, "", cached)


# -- worker processes --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """stdout and stderr (file descriptors 1 and 2, so C-level output too) go to `path` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def execute(cfg: DictConfig, overrides: list[str], run_dir: Path, sweep_dir: Path, threads: int) -> bool:
    """Run one trial in this process as a sweep job; False when a signal interrupted it (recorded in the ledger).
    `trial.json` in the run directory records the command with the threads it ran with."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = sys.argv
    sys.argv = ["train.py", *overrides]
    try:
        with thread_count(threads), output_to(run_dir / "train.log"):
            run_job(cfg, run_dir, [o for o in overrides if not o.startswith("hydra.")], sweep_dir, run_main,
                    summarize=False)
    except SystemExit:  # run_job recorded the interrupted job and stops the "sweep"
        return False
    finally:
        sys.argv = argv
    (run_dir / "trial.json").write_text(json.dumps({"threads": threads, "command": command(overrides, threads)}))
    return True


def command(overrides: list[str], threads: int) -> str:
    return f"OMP_NUM_THREADS={threads} " + shlex.join(["python", "train.py", *overrides])


def _worker(conn: multiprocessing.connection.Connection) -> None:
    os.setsid()  # the terminal's Ctrl-C goes to compare alone; compare passes one SIGINT on to a busy worker
    with contextlib.suppress(KeyboardInterrupt, EOFError, BrokenPipeError):
        while (job := conn.recv()) is not None:
            ok = execute(*job)
            conn.send(ok)
            if not ok:
                break


@dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    index: int | None = None  # the trial it runs
    started: float = 0.0


class Runner:
    """Runs batches of trials: the ledger's finished ones are read back, the rest go to `jobs` workers."""

    def __init__(self, trials_dir: Path, jobs: int, threads: int, metric: str, console: Console) -> None:
        self.dir, self.jobs, self.threads, self.metric, self.console = Path(trials_dir), jobs, threads, metric, console
        self.ledger = Ledger(self.dir)
        self.workers: list[_Worker] = []
        self.ran = self.cached = 0

    def run(self, trials: list[Trial], label: str) -> list[Result]:
        self.dir.mkdir(parents=True, exist_ok=True)
        results: dict[int, Result] = {}
        todo = deque()
        entries, dirs = self.ledger.entries(), self.ledger.dirs()
        for i, trial in enumerate(trials):
            if trial.key in dirs:  # the directory the ledger gave it, maybe under another comparison's name
                trial.run_dir = self.dir / dirs[trial.key]
            entry = entries.get(trial.key, {})
            diverged = entry.get("status") == "failed" and _diverged(entry.get("error") or "")
            if diverged or self.ledger.finished(trial.key):  # a diverged trial is a result, not something missing
                results[i] = read_result(trial, self.ledger, self.metric, cached=True)
            else:
                todo.append(i)
        self.cached += len(results)
        self.console.print(f"[bold]{label}[/]: {len(trials)} trials" +
                           (f", {len(results)} already in {self.ledger.path}" if results else ""), highlight=False)
        if todo:
            self._launch(trials, todo, results)
        return [results[i] for i in range(len(trials))]

    def _launch(self, trials: list[Trial], todo: deque, results: dict[int, Result]) -> None:
        total, done, inline = len(todo), 0, []
        try:
            while self.jobs == 1 and todo:  # one job: in this process, no worker to start
                i = todo.popleft()
                t, start = trials[i], time.perf_counter()
                inline = [t]
                ok = execute(t.cfg, t.overrides, t.run_dir, self.dir, self.threads)
                inline = []
                results[i] = r = read_result(t, self.ledger, self.metric, cached=False)
                if not ok or r.status == "interrupted":
                    raise KeyboardInterrupt
                done += 1
                self.ran += 1
                self._report(r, done, total, time.perf_counter() - start)
            while todo or any(w.index is not None for w in self.workers):
                while todo and (idle := self._idle()) is not None:
                    i = todo.popleft()
                    t = trials[i]
                    idle.index, idle.started = i, time.perf_counter()
                    idle.conn.send((t.cfg, t.overrides, t.run_dir, self.dir, self.threads))
                busy = [w for w in self.workers if w.index is not None]
                for conn in multiprocessing.connection.wait([w.conn for w in busy], timeout=5.0):
                    w = next(w for w in busy if w.conn is conn)
                    try:
                        ok = conn.recv()
                    except (EOFError, OSError):  # the worker died: killed, out of memory, crashed
                        raise self._died(w, trials[w.index]) from None
                    i, seconds = w.index, time.perf_counter() - w.started
                    w.index = None
                    results[i] = r = read_result(trials[i], self.ledger, self.metric, cached=False)
                    if not ok or r.status == "interrupted":
                        raise KeyboardInterrupt
                    done += 1
                    self.ran += 1
                    self._report(r, done, total, seconds)
        except KeyboardInterrupt:
            self._stop(trials, inline)
            raise Interrupted("interrupted") from None
        except WorkerDied:
            self._stop(trials, inline)
            raise

    def _report(self, r: Result, done: int, total: int, seconds: float) -> None:
        t = r.trial
        what = f"{t.option} seed {t.seed}" if t.phase == "seed" else f"{t.option} {t.phase}"
        what += f" lr={t.lr:.3g}" if t.point is not None and t.lr else ""
        if t.point is not None and t.point.extra:
            what += " " + " ".join(f"{k}={v}" for k, v in t.point.extra)
        outcome = (f"{self.metric} {r.value:.5g}" if r.status == "finished" else
                   f"[red]{r.status}[/]: {r.error[:100]}")
        self.console.print(f"  [{done}/{total}] {what}: {outcome} ({seconds:.1f} s)", highlight=False)

    def _idle(self) -> _Worker | None:
        for w in self.workers:
            if w.index is None:
                return w
        if len(self.workers) < self.jobs:
            self.workers.append(self._spawn())
            return self.workers[-1]
        return None

    def _spawn(self) -> _Worker:
        # Workers fork from a fresh server process that imported what a trial needs once (torch._dynamo alone takes
        # seconds); forking compare itself is unsafe once torch's thread pools run, spawning pays the imports twice.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["experiments.compare.runs", "trainer.run", "config", "torch._dynamo"])
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_worker, args=(theirs,), daemon=True)
        process.start()
        theirs.close()
        return _Worker(process, ours)

    def _died(self, w: _Worker, trial: Trial) -> WorkerDied:
        """What ended worker `w` while it ran `trial`, recorded in the ledger (the trial runs again next time)."""
        w.process.join(10)
        self.workers.remove(w)
        code = w.process.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}" + (" (out of memory? the kernel's OOM killer sends it; "
                                                                 "see dmesg)" if code == -signal.SIGKILL else "")
        else:
            how = f"exited with code {code}"
        error = f"its worker process died, {how}"
        self.ledger.append({"key": trial.key, "status": "interrupted", "overrides": trial.overrides,
                            "run_dir": self.ledger.dirs().get(trial.key), "time_s": None, "error": error,
                            "final": {}})
        steps = sorted(trial.run_dir.glob("checkpoints/step-*.pt"))
        where = f"its last checkpoint was {steps[-1]}" if steps else "it had written no checkpoint"
        return WorkerDied(f"trial {trial.run_dir} ({trial.option}, {trial.phase}, seed {trial.seed}): {error}; "
                          f"{where}. The comparison stopped.")

    def _stop(self, trials: list[Trial], inline: list[Trial]) -> None:
        """One SIGINT to every busy worker: its run writes a checkpoint and is recorded as interrupted, or ends if it
        had finished. Then every worker is told to exit and waited for. A trial the signal caught before its run
        took the signals over (it had claimed its directory: "running") is recorded as interrupted here."""
        busy = [w for w in self.workers if w.index is not None and w.process.is_alive()]
        stopped = inline + [trials[w.index] for w in busy]  # `inline`: a trial this process ran itself
        for w in busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGINT)
        deadline = time.monotonic() + 120
        while busy and (left := deadline - time.monotonic()) > 0:
            try:
                ready = multiprocessing.connection.wait([w.conn for w in busy], timeout=left)
            except KeyboardInterrupt:  # a second Ctrl-C: the runs stop at once too
                for w in busy:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.process.pid, signal.SIGINT)
                continue
            for conn in ready:
                w = next(w for w in busy if w.conn is conn)
                with contextlib.suppress(EOFError, OSError):
                    conn.recv()
                w.index = None
                busy.remove(w)
        entries = self.ledger.entries()
        for t in stopped:
            if entries.get(t.key, {}).get("status") == "running":
                self.ledger.append({"key": t.key, "status": "interrupted", "overrides": t.overrides,
                                    "run_dir": entries[t.key].get("run_dir"), "time_s": None,
                                    "error": "stopped before its run began", "final": {}})
        self.close(timeout=30)

    def close(self, timeout: float = 30) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                if w.index is None:
                    w.conn.send(None)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
        self.workers = []
