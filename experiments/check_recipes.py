"""Run the recipes and hold each to the result it declares.

    python -m experiments.check_recipes                  # every recipe's short version (minutes on a CPU)
    python -m experiments.check_recipes --full           # the full recipes, as published (hours on a CPU)
    python -m experiments.check_recipes mnist_vae char_transformer_cpu [--full] [--out DIR] [key=value ...]

Every recipes/<name>.yaml declares its result in an `expect` block:

    expect:
      metric: val_loss        # a key of the run's final_metrics.json
      mode: min               # min: pass when value <= target + tolerance; max: value >= target - tolerance
      target: 1.88
      tolerance: 0.015        # the noise the claim allows (seeds, machines, kernels)
      device: cpu             # where the figure holds: cpu, cuda or any (full version on another device: skipped)
      measured: 1.883         # our own run of the full recipe, for reference
      wall_time_s: 160        # our own run's wall time, `python train.py recipe=<name>` start to end
      measured_on: "AMD EPYC, 2 cores, AVX2, no native bf16; 2 threads"   # where both were measured
      short:                  # the quick version: the same recipe with these overrides, and its own target
        overrides: [trainer.max_steps=300]
        target: 2.40
        tolerance: 0.05
        measured: 2.36
        wall_time_s: 30

Each run is `python train.py recipe=<name> <short overrides> <your key=value> hydra.run.dir=<out>/<name>-<version>`
in a subprocess, exactly what a user would type (the command is printed with the result), so one recipe that
crashes is reported and the others still run. The verdicts go to a table and to `<out>/check.json`.

The table shows each run's wall time and CPU seconds (user + sys) beside the declared time. A run that took
more than twice its declaration (`--time-factor`, 0: no time check) both on the clock and in CPU seconds is SLOW,
and SLOW fails like a missed target: a 2x margin covers machine spread (repeat runs vary by ~10% here), a busy
machine stretches the clock but not the CPU seconds of a one-thread run (and more threads on a quiet machine raise
the CPU seconds, not the clock), so a run beyond it on both is a regression until shown otherwise; and a warning
would scroll past in CI where an exit status does not (a Muon recipe once ran 13x its declared time unnoticed).
On a slower machine than `measured_on` (the table's last lines name both), raise `--time-factor`.

Exit status: 0 when nothing failed (skipped is not failed), 1 when a recipe missed its target, was SLOW, did not
finish or declares no valid `expect` block, 2 for an unknown recipe name or an `--out` that is not empty (a folder
holds one check), 130 after Ctrl-C (the run in progress writes its checkpoint first, and the table covers what ran).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.config import ExpectConfig, options
from core.messages import did_you_mean

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@dataclass(frozen=True)
class Expectation:
    """What one version (short or full) of a recipe must reach."""

    metric: str
    mode: str
    target: float
    tolerance: float
    device: str
    overrides: tuple[str, ...] = ()
    measured: float | None = None
    wall_time_s: float | None = None  # declared: the wall time of the run that measured `measured`
    measured_on: str | None = None

    @property
    def bound(self) -> float:
        return self.target + self.tolerance if self.mode == "min" else self.target - self.tolerance

    def passes(self, value: float) -> bool:
        return value <= self.bound if self.mode == "min" else value >= self.bound

    @property
    def rule(self) -> str:
        sign = "<=" if self.mode == "min" else ">="
        slack = "+" if self.mode == "min" else "-"
        pm = f" (target {self.target:g} {slack} {self.tolerance:g})" if self.tolerance else ""
        return f"{self.metric} {sign} {self.bound:g}{pm}"


@dataclass
class Result:
    recipe: str
    version: str
    status: str  # passed | FAILED | SLOW | error | skipped
    rule: str = ""
    value: float | None = None
    measured: float | None = None
    device: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + sys seconds of the run's process
    declared_s: float | None = None
    measured_on: str | None = None
    command: str = ""
    run_dir: str = ""
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def recipe_names() -> list[str]:
    return options("recipe")


def declared(name: str, overrides: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """The recipe's `expect` block, as `python train.py recipe=<name> <overrides>` composes it, and what the
    config validator (the one train.py runs) finds wrong with it."""
    from omegaconf import OmegaConf

    from config import problems
    from core.config import compose

    cfg = compose([f"recipe={name}", *overrides])
    expect = cfg.get("expect")
    if expect is None:
        return None, []
    bad = [p for p in problems(cfg) if p.startswith("expect")]
    return OmegaConf.to_container(expect, resolve=not bad), bad  # a value that does not resolve is among `bad`


def expectation(expect: dict[str, Any], version: str) -> Expectation:
    """The full version's or the short version's expectation from an `expect` block (its defaults: the model's)."""
    e = ExpectConfig.model_validate(OmegaConf.to_container(expect) if isinstance(expect, DictConfig) else expect)
    base = dict(metric=e.metric, mode=e.mode, device=e.device, measured_on=e.measured_on)
    if version == "full":
        return Expectation(**base, target=e.target, tolerance=e.tolerance, measured=e.measured,
                           wall_time_s=e.wall_time_s)
    short = e.short
    # The short version runs wherever the checker runs: it is a quick proof that the recipe still learns.
    return Expectation(**{**base, "device": "any"}, target=short.target, tolerance=short.tolerance,
                       overrides=tuple(short.overrides), measured=short.measured, wall_time_s=short.wall_time_s)


def this_machine() -> str:
    """The CPU (name, cores, the flags that decide speed here) and the GPU if any, in measured_on's words."""
    import torch  # heavy: --help, argument errors and the recipe list answer without loading torch

    caps = torch.cpu.get_capabilities()
    simd = "AVX512" if caps.get("avx512_f") else "AVX2" if caps.get("avx2") else caps.get("architecture", "")
    bf16 = any(caps.get(f, False) for f in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    cores = caps.get("num_physical_cores") or torch.get_num_threads()
    cpu = f"{caps.get('cpu_name', 'CPU')}, {cores} cores, {simd}, {'native' if bf16 else 'no native'} bf16"
    return cpu + (f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def judge_time(result: Result, exp: Expectation, time_factor: float) -> None:
    """SLOW when the run took more than time_factor x its declared time on the clock and in CPU seconds alike
    (0: no check)."""
    result.declared_s, result.measured_on = exp.wall_time_s, exp.measured_on
    took = min(result.wall_s, result.cpu_s)
    if not (time_factor and exp.wall_time_s and took > time_factor * exp.wall_time_s):
        return
    slow = (f"took {result.wall_s:.0f} s ({result.cpu_s:.0f} CPU s), {took / exp.wall_time_s:.1f}x the "
            f"{exp.wall_time_s:g} s it declares (limit {time_factor:g}x; measured on "
            f"{exp.measured_on or 'an unnamed machine'}, this is {this_machine()})")
    if result.status == "passed":
        result.status, result.reason = "SLOW", slow
    else:
        result.reason += f"; and it {slow}"


def children_cpu_s() -> float:
    """User + sys seconds of this process's finished children (the runs, one at a time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_one(name: str, version: str, out: Path, extra: list[str], timeout: float | None,
              has_cuda: bool, time_factor: float = 2.0) -> Result:
    try:
        expect, bad = declared(name, extra)
    except Exception as e:  # a composition error: the recipe itself is broken
        return Result(name, version, "error", reason=f"does not compose: {type(e).__name__}: {e}")
    if expect is None:
        return Result(name, version, "error", reason="declares no `expect` block (see experiments/check_recipes.py)")
    missing = [f"expect.{k}: missing" for k in ("metric", "target", "short") if k not in expect]
    if bad or missing:
        return Result(name, version, "error", reason=f"invalid expect block: {'; '.join(bad + missing)}")
    exp = expectation(expect, version)
    result = Result(name, version, "skipped", rule=exp.rule, measured=exp.measured)
    if exp.device == "cuda" and not has_cuda:
        result.reason = "needs a CUDA GPU (the figure was measured on one); none here"
        return result

    run_dir = out / f"{name}-{version}"
    args = [f"recipe={name}", *exp.overrides, *extra]
    result.command = shlex.join(["python", "train.py", *args])
    result.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), children_cpu_s()
    with open(run_dir / "check.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the run finishes its step and writes a checkpoint
            proc.wait()
            result.wall_s = time.perf_counter() - start
            result.status, result.reason = "error", f"did not finish within {timeout:g} s"
            return result
        except KeyboardInterrupt:
            proc.wait()  # Ctrl-C reached the run too: let it write its checkpoint (trainer.resume=<run dir>)
            raise
    result.wall_s, result.cpu_s = time.perf_counter() - start, children_cpu_s() - cpu
    metrics_file = run_dir / "final_metrics.json"
    if returncode != 0 or not metrics_file.is_file():
        tail = (run_dir / "check.log").read_text(errors="replace").strip().splitlines()[-3:]
        result.status = "error"
        result.reason = f"train.py exited with {returncode}: " + " | ".join(tail)
        return result
    metrics = json.loads(metrics_file.read_text())
    manifest_file = run_dir / "manifest.json"
    result.device = json.loads(manifest_file.read_text()).get("device", "") if manifest_file.is_file() else ""
    value = metrics.get(exp.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        result.status = "error"
        result.reason = f"final_metrics.json has no number {exp.metric!r} (it has {', '.join(metrics)})"
        return result
    result.value = float(value)
    result.extra = {k: v for k, v in metrics.items() if k in ("step", "wall_time_s", "stop_reason")}
    result.status = "passed" if exp.passes(result.value) else "FAILED"
    if result.status == "FAILED":
        result.reason = f"{exp.metric} = {result.value:.6g}, the recipe declares {exp.rule}"
    judge_time(result, exp, time_factor)
    return result


def report(results: list[Result], console: Console) -> None:
    table = Table(title="recipes against their declared results")
    for col in ("recipe", "version", "rule", "value", "measured", "device", "time", "CPU", "declared", "status"):
        table.add_column(col, justify="right" if col in ("value", "measured", "time", "CPU", "declared") else "left")
    colour = {"passed": "green", "FAILED": "red", "SLOW": "red", "error": "red", "skipped": "yellow"}
    for r in results:
        table.add_row(r.recipe, r.version, r.rule, "" if r.value is None else f"{r.value:.5g}",
                      "" if r.measured is None else f"{r.measured:.5g}", r.device,
                      f"{r.wall_s:.0f} s" if r.wall_s else "", f"{r.cpu_s:.0f} s" if r.wall_s else "",
                      f"{r.declared_s:g} s" if r.declared_s else "",
                      f"[{colour[r.status]}]{r.status}[/]")
    console.print(table)
    if any(r.declared_s and r.wall_s for r in results):
        machines = sorted({r.measured_on or "(not stated)" for r in results if r.declared_s and r.wall_s})
        console.print(f"declared times measured on: {'; '.join(machines)}\nthis machine: {this_machine()}",
                      highlight=False)
    for r in results:
        if r.reason:
            console.print(f"  {r.recipe} ({r.version}, {r.status}): {escape(r.reason)}", highlight=False)
        if r.status in ("FAILED", "SLOW", "error") and r.command:
            console.print(escape(f"    reproduce: {r.command}   (log: {r.run_dir}/check.log)"), highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.check_recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="recipe|key=value",
                        help="recipes to check (default: all in recipes/) and config overrides for every run")
    parser.add_argument("--full", action="store_true", help="run the full recipes instead of the short versions")
    parser.add_argument("--out", type=Path, help="where the runs go (default: runs/check_recipes/<time>)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per run (default: none)")
    parser.add_argument("--time-factor", type=float, default=2.0,
                        help="a run slower than this many times its declared wall time is SLOW, a failure "
                             "(default: 2; 0: no time check)")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))

    extra = [i for i in args.items if "=" in i]
    names = [i for i in args.items if "=" not in i] or recipe_names()
    unknown = [n for n in names if not (RECIPES / f"{n}.yaml").is_file()]
    if unknown:
        from core.log import print_error

        print_error("; ".join(f"unknown recipe {n!r}: {did_you_mean(n, recipe_names())}" for n in unknown))
        return 2
    version = "full" if args.full else "short"
    out = args.out or ROOT / "runs" / "check_recipes" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if out.is_dir() and any(out.iterdir()):  # a folder holds one check: its check.json and runs stay as they were
        from core.log import print_error

        what = "a previous check (check.json)" if (out / "check.json").is_file() else "other files"
        print_error(f"--out {out} holds {what}; give another --out (without --out, a new folder named by the "
                    "time), or remove it")
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from core.log import print_error

        print_error(f"--out {out}: cannot create it ({e.strerror}); give a folder you can write in")
        return 2

    import torch  # heavy, see this_machine()

    has_cuda = torch.cuda.is_available()
    results = []
    interrupted = False
    for name in names:
        console.print(f"[bold]{name}[/] ({version}) ...", highlight=False)
        try:
            results.append(check_one(name, version, out, extra, args.timeout, has_cuda, args.time_factor))
        except KeyboardInterrupt:  # report what has run so far
            interrupted = True
            results += [Result(n, version, "skipped", reason="interrupted (Ctrl-C)") for n in names[len(results):]]
            break
        r = results[-1]
        took = (f", {r.wall_s:.0f} s, {r.cpu_s:.0f} CPU s" + (f" (declared {r.declared_s:g} s)" if r.declared_s else "")
                if r.wall_s else "")
        console.print(f"  {r.status}" + (f": {r.value:.6g} ({r.rule}){took}" if r.value is not None else
                                         f": {escape(r.reason)}" if r.reason else ""), highlight=False)
    report(results, console)
    (out / "check.json").write_text(json.dumps({"version": version, "overrides": extra, "machine": this_machine(),
                                                "time_factor": args.time_factor,
                                                "results": [asdict(r) for r in results]}, indent=2) + "\n")
    console.print(f"results: {out / 'check.json'}", highlight=False)
    if interrupted:
        return 130
    return 1 if any(r.status in ("FAILED", "SLOW", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
