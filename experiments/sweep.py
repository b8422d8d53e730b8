"""Sweeps (Hydra multirun): failure isolation, a resumable ledger, and the end-of-sweep summary.

One job of a sweep runs through `run_job`: a job that fails (a UserError -> SystemExit from trainer.run.main, or
any other Exception) is recorded as failed in its run directory and in the ledger, and returns normally so the
launcher goes on with the others. A signal (Ctrl-C, SIGTERM) ends the whole sweep: the job is recorded as
interrupted and the table so far is printed.

The ledger (`<sweep dir>/ledger.jsonl`) keys a job by its content (overrides + config hash); each key owns one
run directory, under a file lock (DESIGN.md).

`SweepSummary` is a Hydra callback (hydra.callbacks in conf/train.yaml): at the end of a multirun it prints a rich
table of every job's final and best monitored metric, status and time, sorted by the task's `monitor` (metric +
mode), writes the same rows to summary.csv and summary.json, and fills TensorBoard's HPARAMS view (hparams/ in the
sweep directory) with the swept overrides and the real final metrics.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from core.errors import UserError
from core.log import print_error

LEDGER = "ledger.jsonl"
STATUS = "status.json"
_NOT_METRICS = {"step", "epoch", "wall_time_s", "session_wall_time_s", "stop_reason", "restored_best_step"}


def optuna_direction(mode: str) -> str:
    """monitor.mode (min | max) -> Optuna's direction (minimize | maximize), for `${kiln.direction:...}`."""
    try:
        return {"min": "minimize", "max": "maximize"}[str(mode)]
    except KeyError:
        raise ValueError(f"monitor.mode={mode!r}: use min or max") from None


if not OmegaConf.has_resolver("kiln.direction"):
    OmegaConf.register_new_resolver("kiln.direction", optuna_direction)


# -- the ledger -------------------------------------------------------------------------------------------------
def job_key(overrides: list[str], cfg: DictConfig) -> str:
    """What identifies a job across re-runs: its sorted overrides and a hash of its resolved config."""
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True)
    except Exception:  # an interpolation that does not resolve: the job fails later and says why
        text = OmegaConf.to_yaml(cfg, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return " ".join(sorted(overrides)) + f" #{digest}"


class Ledger:
    """`<sweep dir>/ledger.jsonl`: a "running" line when a job claims its directory, one more when it ends
    (finished, failed or interrupted). The last line of a key gives its status; the first line that names a
    directory makes its key the directory's owner for good."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path = Path(sweep_dir) / LEDGER
        self.lock = FileLock(f"{self.path}.lock")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if isinstance(entry, dict) and "key" in entry:
                    out.append(entry)
        return out

    def entries(self) -> dict[str, dict[str, Any]]:
        """The latest line of every key."""
        return {e["key"]: e for e in self.lines()}

    def dirs(self) -> dict[str, str]:
        """key -> the run directory (relative to the sweep directory) it owns. A directory belongs to the first key
        that named it; a later key naming it too (a ledger written before directories were owned) owns nothing."""
        owner: dict[str, str] = {}
        taken: set[str] = set()
        for e in self.lines():
            rel = e.get("run_dir")
            if rel is None or e["key"] in owner:
                continue
            if rel not in taken:
                owner[e["key"]] = rel
                taken.add(rel)
        return owner

    def append(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self._write(entry)

    def _write(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)

    def claim(self, key: str, overrides: list[str], candidates: list[str]) -> str | None:
        """The run directory of `key`: the one it owns already, else the first candidate that no other key owns and
        that holds nothing but Hydra's files, which it now owns (a "running" line). None when no candidate is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            dirs = self.dirs()
            if key in dirs:
                return dirs[key]
            owned = set(dirs.values())
            for rel in candidates:
                if rel not in owned and _unused(self.path.parent / rel, key):
                    self._write({"key": key, "status": "running", "overrides": list(overrides), "run_dir": rel,
                                 "started": time.time()})
                    return rel
        return None

    def finished(self, key: str) -> dict[str, Any] | None:
        """The ledger entry of a finished job whose run directory still holds its final metrics and says it is
        this job's (status.json names the key)."""
        entry, rel = self.entries().get(key), self.dirs().get(key)
        if entry and entry["status"] == "finished" and rel is not None:
            run_dir = self.path.parent / rel
            if (run_dir / "final_metrics.json").is_file() and _read_json(run_dir / STATUS).get("key") == key:
                return entry
        return None


def _unused(run_dir: Path, key: str) -> bool:
    """Nothing there yet but what Hydra writes before the job starts (.hydra/, the job's log), or a directory that
    says it is this key's."""
    if not run_dir.is_dir():
        return True
    status = _read_json(run_dir / STATUS)
    if status:
        return status.get("key") == key
    return all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def job_dir(*, _root_: DictConfig) -> str:
    """`hydra.sweep.subdir: ${kiln.job_dir:}`: the run directory the ledger gives this job (see Ledger.claim),
    decided before Hydra creates it or writes .hydra/ into it: `<job num>` unless another key owns that, else
    `<job num>-<hash of the key>`."""
    hydra = _root_.hydra
    num = str(hydra.job.num)
    task_cfg = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])
    if OmegaConf.select(task_cfg, "trainer.dry_run"):  # nothing trains: no ledger
        return num
    overrides = OmegaConf.to_container(hydra.overrides.task)  # as train.py reads them
    key = job_key(overrides, task_cfg)
    h = key_hash(key)
    candidates = [num, f"{num}-{h}", *(f"{num}-{h}-{i}" for i in range(2, 100))]
    rel = Ledger(Path(str(hydra.sweep.dir))).claim(key, overrides, candidates)
    if rel is None:  # 100 directories of other jobs under names derived from this key's hash: not by chance
        raise UserError(f"no free run directory for job {num} in {hydra.sweep.dir}")
    return rel


if not OmegaConf.has_resolver("kiln.job_dir"):
    OmegaConf.register_new_resolver("kiln.job_dir", job_dir)


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATUS).write_text(json.dumps(status, indent=2) + "\n")


def _set_aside_previous_attempt(run_dir: Path) -> None:
    """A job that runs again in its old directory (it failed or was interrupted) moves what the earlier attempt
    left into `previous_attempt_<n>/`, so metrics.jsonl, TensorBoard events and checkpoints start clean."""
    leftovers = [p for p in run_dir.iterdir() if p.name not in (".hydra", STATUS) and p.suffix != ".log"
                 and not p.name.startswith("previous_attempt_")] if run_dir.is_dir() else []
    if not leftovers:
        return
    n = 1
    while (run_dir / f"previous_attempt_{n}").exists():
        n += 1
    dest = run_dir / f"previous_attempt_{n}"
    dest.mkdir()
    for p in leftovers:
        shutil.move(str(p), dest / p.name)


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def run_job(cfg: DictConfig, run_dir: Path, overrides: list[str], sweep_dir: Path,
            run_main: Callable[[DictConfig, Path, list[str]], dict[str, Any]], summarize: bool = True) -> float | None:
    """One job of a multirun: skip it if the ledger says it finished, else run it and record how it ended.
    Never raises for a failed run (KeyboardInterrupt still stops the sweep); returns the monitored metric
    (None when the job failed: Optuna records the trial as failed). `summarize=False` (experiments.compare, which
    reports by itself): an interrupted job prints no sweep table and no resume hint."""
    run_dir, sweep_dir = Path(run_dir), Path(sweep_dir)
    if cfg.trainer.get("dry_run"):  # nothing trains: no ledger, but one bad job still does not stop the rest
        try:
            return run_main(cfg, run_dir, overrides).get(cfg.monitor.metric)
        except SystemExit:
            return None
    if cfg.trainer.get("strategy") == "ddp":
        _export_slurm_ranks()
    if int(os.environ.get("RANK", "0")) != 0:  # DDP: rank 0 keeps the books
        return run_main(cfg, run_dir, overrides).get(cfg.monitor.metric)
    ledger = Ledger(sweep_dir)
    key = job_key(overrides, cfg)
    rel = _relative(run_dir, sweep_dir)
    done = ledger.finished(key)
    if done:
        print(f"skipped: {' '.join(overrides)} already finished in {sweep_dir / done['run_dir']} "
              f"(ledger {ledger.path})")
        return (done.get("final") or {}).get(cfg.monitor.metric)

    own = ledger.claim(key, overrides, [rel])
    if own is None:  # only a custom hydra.sweep.subdir can do this; the default asks the ledger first
        owner = next((k for k, d in ledger.dirs().items() if d == rel), "another job")
        error = (f"hydra.sweep.subdir gives this job the run directory {run_dir}, which belongs to another job of "
                 f"this sweep directory ({owner}); its files are left alone. Keep the default hydra.sweep.subdir "
                 "(${kiln.job_dir:}, a directory per job) or use another hydra.sweep.dir.")
        print_error(error)
        ledger.append({"key": key, "status": "failed", "overrides": list(overrides), "run_dir": None,
                       "time_s": 0.0, "error": f"ConfigError: {error}", "final": {}})
        return None
    if own != rel:  # a custom subdir that changed between invocations: the job goes back to its own directory
        print(f"{' '.join(overrides)}: runs in {sweep_dir / own}, the directory this job owns in {ledger.path}")
        rel, run_dir = own, sweep_dir / own

    _set_aside_previous_attempt(run_dir)
    started = time.time()
    status: dict[str, Any] = {"status": "running", "key": key, "overrides": list(overrides), "run_dir": rel,
                              "started": started}
    _write_status(run_dir, status)
    final: dict[str, Any] = {}
    try:
        final = run_main(cfg, run_dir, overrides)
        status.update(status="finished")
    except SystemExit as e:  # trainer.run.main printed the UserError; sys.exit's context is that error
        cause = e.__context__
        status.update(status="failed", exit_code=e.code,
                      error=f"{type(cause).__name__}: {cause}" if isinstance(cause, UserError) else f"exit {e.code}")
        if type(cause).__name__ == "Interrupted":  # SIGINT / SIGTERM: the user stops the sweep, not this job
            _stop_sweep(cfg, run_dir, sweep_dir, ledger, key, status, overrides, started, e, summarize)
    except UserError as e:  # HYDRA_FULL_ERROR=1 lets it through unprinted
        print_error(str(e))
        status.update(status="failed", exit_code=e.exit_code, error=f"{type(e).__name__}: {e}")
        if type(e).__name__ == "Interrupted":
            _stop_sweep(cfg, run_dir, sweep_dir, ledger, key, status, overrides, started, e, summarize)
    except KeyboardInterrupt as e:
        status.update(exit_code=130, error="KeyboardInterrupt")
        _stop_sweep(cfg, run_dir, sweep_dir, ledger, key, status, overrides, started, e, summarize)
    except Exception as e:
        text = traceback.format_exc()
        print(text, file=sys.stderr)
        (run_dir / "error.txt").write_text(text)
        status.update(status="failed", exit_code=1, error=f"{type(e).__name__}: {e}")
    status.update(ended=time.time(), time_s=round(time.time() - started, 2))
    _write_status(run_dir, status)
    ledger.append({"key": key, "status": status["status"], "overrides": list(overrides), "run_dir": rel,
                   "time_s": status["time_s"], "error": status.get("error"), "final": _jsonable(final)})
    if status["status"] == "failed":
        print(f"failed: {' '.join(overrides)}: {status['error']} (the sweep goes on)", file=sys.stderr)
        return None
    return final.get(cfg.monitor.metric)


def _stop_sweep(cfg: DictConfig, run_dir: Path, sweep_dir: Path, ledger: Ledger, key: str, status: dict[str, Any],
                overrides: list[str], started: float, error: BaseException, summarize: bool) -> None:
    """A signal stopped this job: record it as interrupted, print the table so far and how to resume, and end the
    whole sweep (the launcher would otherwise go on with the next job)."""
    status.update(status="interrupted", ended=time.time(), time_s=round(time.time() - started, 2))
    _write_status(run_dir, status)
    ledger.append({"key": key, "status": "interrupted", "overrides": list(overrides), "run_dir": status["run_dir"],
                   "time_s": status["time_s"], "error": status.get("error"), "final": {}})
    if summarize:
        write_summary(sweep_dir, cfg.monitor.metric, cfg.monitor.mode)
        print(f"sweep interrupted: run the same command with hydra.sweep.dir={sweep_dir} to resume (finished jobs "
              "are skipped; this one starts again)", file=sys.stderr)
    code = error.code if isinstance(error, SystemExit) else getattr(error, "exit_code", 130)
    raise SystemExit(code) from None


def _export_slurm_ranks() -> None:
    """Under the submitit launcher with tasks_per_node > 1, every task runs this job: set the torch.distributed
    variables torchrun would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from SLURM's."""
    if "RANK" in os.environ or "SLURM_JOB_ID" not in os.environ:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment  # optional: the SLURM launcher's package
    except ImportError:
        return
    with contextlib.suppress(RuntimeError):  # not inside a submitit job (plain srun/sbatch): leave it to torchrun
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # LOCAL_RANK picks the GPU


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


# -- the summary ------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _best(run_dir: Path, metric: str, mode: str) -> tuple[float | None, int | None]:
    """The best logged `eval/<metric>` of a run and its step (from metrics.jsonl)."""
    best, best_step = None, None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        v = row.get(f"eval/{metric}")
        if isinstance(v, (int, float)) and math.isfinite(v) and (
                best is None or (v < best if mode == "min" else v > best)):
            best, best_step = v, row.get("step")
    return best, best_step


def _split(override: str) -> tuple[str, str]:
    k, _, v = override.partition("=")
    return k.lstrip("+~"), v


def collect(sweep_dir: Path, metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per job of the sweep directory (the latest ledger line of each key), sorted: finished jobs by the
    monitored metric (best first), then the others. A row's numbers come from the directory its key owns, and only
    when that directory's status.json names the same key."""
    sweep_dir = Path(sweep_dir)
    ledger = Ledger(sweep_dir)
    entries, dirs = ledger.entries(), ledger.dirs()
    rows: list[dict[str, Any]] = []
    for key, entry in entries.items():
        rel = dirs.get(key)
        status, error = entry["status"], entry.get("error") or ""
        if status == "running":  # claimed its directory, never ended: killed, or still running elsewhere
            status, error = "interrupted", "started, never ended"
        ours = rel is not None and _read_json(sweep_dir / rel / STATUS).get("key", key) == key
        if not ours and entry.get("run_dir") is not None:  # a ledger from before directories had owners
            status, error = "failed", f"{entry['run_dir']} holds another job's files; run it again"
        final = _read_json(sweep_dir / rel / "final_metrics.json") if ours and status == "finished" else {}
        best, best_step = _best(sweep_dir / rel, metric, mode) if ours else (None, None)
        final_value = final.get(metric)
        if best is None or (isinstance(final_value, (int, float)) and
                            (final_value < best if mode == "min" else final_value > best)):
            best, best_step = final_value, final.get("step")
        rows.append({
            "run_dir": rel or "-", "status": status, "overrides": entry["overrides"],
            f"final/{metric}": final_value, f"best/{metric}": best, "best_step": best_step,
            **{f"final/{k}": v for k, v in final.items() if k not in _NOT_METRICS and k != metric},
            "step": final.get("step"), "train_time_s": final.get("wall_time_s"), "time_s": entry.get("time_s"),
            "error": error,
        })
    known = {r["run_dir"] for r in rows}
    for status_file in sorted(sweep_dir.glob(f"*/{STATUS}")):  # started before the ledger named directories
        status = _read_json(status_file)
        rel = status_file.parent.name
        if status.get("status") == "running" and rel not in known and status.get("key") not in entries:
            rows.append({"run_dir": rel, "status": "interrupted", "overrides": status.get("overrides", []),
                         f"final/{metric}": None, f"best/{metric}": None, "best_step": None, "step": None,
                         "train_time_s": None, "time_s": None, "error": "started, never ended"})

    def order(row: dict[str, Any]) -> tuple:
        v = row[f"final/{metric}"]
        ok = row["status"] == "finished" and isinstance(v, (int, float)) and math.isfinite(v)
        return (0, v if mode == "min" else -v) if ok else (1, row["status"], row["run_dir"])

    rows.sort(key=order)
    return rows


def _swept_keys(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(override keys whose value differs between rows, overrides common to every row)."""
    per_row = [dict(_split(o) for o in r["overrides"]) for r in rows]
    keys: list[str] = []
    for d in per_row:
        keys += [k for k in d if k not in keys]
    swept = [k for k in keys if len({d.get(k) for d in per_row}) > 1 or len(rows) == 1]
    common = [f"{k}={per_row[0][k]}" for k in keys if k not in swept and k in per_row[0]]
    return swept, common


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def write_summary(sweep_dir: Path, metric: str, mode: str, console: Console | None = None) -> list[dict[str, Any]]:
    """Print the table, write summary.csv / summary.json and the TensorBoard hparams; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir, metric, mode)
    swept, common = _swept_keys(rows)
    extra = [k for r in rows for k in r if k.startswith("final/") and k != f"final/{metric}"]
    extra = list(dict.fromkeys(extra))
    for r in rows:
        d = dict(_split(o) for o in r["overrides"])
        r["params"] = {k: d.get(k) for k in swept}

    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "interrupted")}
    table = Table(title=f"sweep {sweep_dir}: {len(rows)} runs, " + ", ".join(f"{n} {s}" for s, n in counts.items()
                                                                              if n),
                  caption=("common: " + " ".join(common)) if common else None)
    table.add_column("#", justify="right")
    for k in swept:
        table.add_column(k)
    table.add_column("status")
    table.add_column(f"{metric} ({mode})", justify="right")
    table.add_column(f"best {metric}", justify="right")
    table.add_column("@step", justify="right")
    for k in extra:
        table.add_column(k.removeprefix("final/"), justify="right")
    table.add_column("steps", justify="right")
    table.add_column("time", justify="right")
    errors = any(r["error"] for r in rows)
    if errors:
        table.add_column("error")
    style = {"finished": "green", "failed": "red", "interrupted": "yellow"}
    for r in rows:
        table.add_row(r["run_dir"], *[_fmt(r["params"][k]) for k in swept],
                      f"[{style.get(r['status'], '')}]{r['status']}[/]", _fmt(r[f"final/{metric}"]),
                      _fmt(r[f"best/{metric}"]), _fmt(r["best_step"]), *[_fmt(r.get(k)) for k in extra],
                      _fmt(r["step"]), "-" if r["time_s"] is None else f"{r['time_s']:.1f}s",
                      *([" ".join(r["error"].split())[:160]] if errors else []))
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 160))
    console.print(table)

    fields = ["run_dir", *swept, "status", f"final/{metric}", f"best/{metric}", "best_step", *extra, "step",
              "train_time_s", "time_s", "error", "overrides"]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **r["params"], "overrides": " ".join(r["overrides"])})
    summary = {"sweep_dir": str(sweep_dir), "monitor": {"metric": metric, "mode": mode}, "swept": swept,
               "common": common, "counts": counts, "runs": rows}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_hparams(sweep_dir, rows, metric, extra)
    return rows


def _hparam_value(v: str | None) -> float | str | bool:
    if v is None:
        return "-"
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return float(v)
    except ValueError:
        return v


def _write_hparams(sweep_dir: Path, rows: list[dict[str, Any]], metric: str, extra: list[str]) -> None:
    """TensorBoard HPARAMS: one session per finished job (swept overrides -> real final and best metrics)."""
    from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard): only when a sweep summarizes

    root = sweep_dir / "hparams"
    shutil.rmtree(root, ignore_errors=True)  # regenerated from the ledger on every summary
    for r in rows:
        if r["status"] != "finished":
            continue
        metrics = {f"hparam/{k}": float(r[k]) for k in (f"final/{metric}", f"best/{metric}", *extra)
                   if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)}
        hparams = {k: _hparam_value(v) for k, v in r["params"].items()}
        with SummaryWriter(str(root / r["run_dir"])) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")


class SweepSummary(Callback):
    """Hydra callback: the end-of-sweep table, summary.csv / summary.json and TensorBoard hparams."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not (sweep_dir / LEDGER).is_file():  # e.g. a dry run: nothing ran
            return
        monitor = config.get("monitor") or {}
        write_summary(sweep_dir, monitor.get("metric", "loss"), monitor.get("mode", "min"))
