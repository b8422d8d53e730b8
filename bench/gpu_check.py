"""Every CUDA-specific path of kiln, run on one GPU: a table of what held, with figures, and a JSON file.

    python -m bench.gpu_check                 # on a CUDA machine: every check, then the full GPU recipe
    python -m bench.gpu_check --quick         # the same without the full recipe (a few minutes)
    python -m bench.gpu_check --device cpu    # the checks that mean something on a CPU (exercises the harness)
    make gpu-check ARGS=--quick

Checks, each in its own function; one that fails or crashes is reported and the others still run:

  bf16_autocast     the char-GPT in bf16 autocast follows its float32 run; a Linear's output really is bf16
  fp16_grad_scaler  fp16 autocast + GradScaler: a forced overflow is skipped and redone (the step counter and the
                    schedule do not advance, the scale halves per attempt), and past trainer.fp16_max_retries the
                    batch is given up as non-finite (trainer/loop.py `_update`)
  fused_adamw       torch's fused AdamW equals its foreach AdamW within float tolerance, on identical gradients
  compile           torch.compile'd training follows eager training's losses
  tf32              trainer.tf32=true turns TF32 on; TF32 off is float32-exact, on is not (so it is really used)
  host_syncs        the training steps between log intervals run under torch.cuda.set_sync_debug_mode("error")
                    (amp=bf16, nonfinite=raise): a host synchronisation per step fails loudly; a NaN injected
                    there is still reported, at the next log interval, with its step
  replay            a short run of the GPU recipe replays (python -m experiments.replay) within its stated tolerance
  ddp               trainer.strategy=ddp under torchrun with one process (nccl) equals the single-process run
  throughput        tokens/s and peak memory (torch.cuda.max_memory_allocated) of the GPU recipe's char-GPT
  recipe            the full recipe=char_transformer_gpu: wall time and val_loss against its expect block

`--device cpu` runs them on the CPU where that means something: fp16 with torch.amp.GradScaler("cpu"), host_syncs
as host reads (.item(), bool(), ...) caught in the same windows (CUDA's debug mode also catches syncs inside
kernels), ddp with gloo, a small char-GPT; tf32 and the full recipe are skipped. Without CUDA and without
--device, nothing is run: the plan (every check and its exact commands) is printed, exit 0 (CI runs this).

Results: a table (check, status ok / FAILED / skipped, figures, seconds) and --out (default
runs/gpu_check/<time>/gpu_check.json). Exit status 1 when a check failed, else 0; 2 for bad arguments.
Runs in this process use the trainer's own build() and Trainer (what `python train.py <overrides>` runs; the
equivalent command is printed in the plan); torchrun, the replay and the full recipe run as subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPE = "char_transformer_gpu"
# Short runs of the recipe: no evaluation or checkpoint until the end, a small fixed validation set, no sample text.
SHORT = ["trainer.eval_interval=0", "trainer.checkpoint_interval=0", "trainer.histogram_interval=0",
         "trainer.pictures=false", "trainer.progress=off", "task.eval_batches=4", "task.sample_chars=0"]
# On a CPU the recipe's model shrinks to something that trains in seconds.
CPU_MODEL = ["task.block_size=32", "task.batch_size=8", "task.n_layer=2", "task.n_head=2", "task.n_embd=64",
             "task.eval_batch_size=16", "task.eval_batches=2", "trainer.compile=false"]


class Failed(Exception):
    """A check's claim did not hold; `figures` are what it measured."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


class Skipped(Exception):
    """The check means nothing here (e.g. TF32 on a CPU)."""


@dataclass
class Ctx:
    device: str  # "cuda" or "cpu"
    out: Path  # the results folder; every check works in out/work/<check>/
    threads: int | None = None
    quick: bool = False
    python: str = sys.executable

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def pick(self, cuda: Any, cpu: Any) -> Any:
        """A figure for this device: CPU runs are shorter (the harness is exercised; the GPU figures are the point)."""
        return cuda if self.cuda else cpu

    def base(self) -> list[str]:
        """A short run of the GPU recipe on this device (a small model on a CPU)."""
        steps, log, warmup = self.pick((40, 10, 10), (20, 5, 2))
        base = [f"recipe={RECIPE}", f"trainer.device={self.device}", f"trainer.max_steps={steps}",
                f"trainer.log_interval={log}", f"schedule.warmup={warmup}", *SHORT]
        if not self.cuda:
            base += CPU_MODEL + ([f"trainer.threads={self.threads}"] if self.threads else [])
        return base

    def overrides(self, *extra: str) -> list[str]:
        """The short run, then `extra` (a key given twice takes the later value, as on train.py's command line)."""
        return [*self.base(), *extra]

    def shorten(self, command: str) -> str:
        """A command as the plan shows it: $S for the short run's overrides, $O for the work folder."""
        return command.replace(shlex.join(self.base()), "$S").replace(str(self.out / "work"), "$O")

    def work(self, check: str) -> Path:
        return self.out / "work" / check


def train_py(overrides: list[str], run_dir: Path | str) -> str:
    """The command line a user would type for an in-process run."""
    return shlex.join(["python", "train.py", *overrides, f"hydra.run.dir={run_dir}"])


# -- running the trainer in this process ------------------------------------------------------------------------------
def compose(overrides: list[str]):
    """The config `python train.py <overrides>` runs (without Hydra's own node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg


class Recorder:
    """A logger that keeps every logged row in memory (and prints nothing)."""

    writer = None

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def advance(self, step: int) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float], console: bool = False) -> None:
        self.rows.append({"step": step, **values})

    def info(self, message: str) -> None:
        pass

    def series(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.rows if key in r}


@dataclass
class Trained:
    final: dict[str, Any]
    log: Recorder
    trainer: Any
    seconds: float


def train(overrides: list[str], run_dir: Path, tweak: Callable | None = None,
          fit: Callable | None = None) -> Trained:
    """build() -> (tweak the parts) -> Trainer -> fit, as trainer.run does, logging into a Recorder."""
    from trainer.build import build
    from trainer.loop import Trainer

    start = time.perf_counter()
    parts = build(compose(overrides))
    if tweak is not None:
        parts = tweak(parts)
    trainer = Trainer(parts, run_dir)
    log = Recorder()
    final = fit(trainer, log) if fit is not None else trainer.fit(log)
    return Trained(final, log, trainer, time.perf_counter() - start)


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    if a.keys() != b.keys() or not a:
        raise Failed(f"the runs logged different steps: {sorted(a)} vs {sorted(b)}")
    return max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-30) for k in a)


def run_command(cmd: list[str], log_file: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `cmd` in the repository root, output into `log_file`; (exit status, the output's tail)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = -1
    text = log_file.read_text(errors="replace")
    return code, text[-3000:]


def py(args: list[str]) -> str:
    return shlex.join(["python", *args])


# -- the checks ---------------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    what: str
    run: Callable[[Ctx], dict[str, Any]]
    commands: Callable[[Ctx], list[str]]


CHECKS: list[Check] = []


def check(what: str, commands: Callable[[Ctx], list[str]]) -> Callable:
    def register(fn: Callable[[Ctx], dict[str, Any]]) -> Callable:
        CHECKS.append(Check(fn.__name__.removeprefix("check_"), what, fn, commands))
        return fn

    return register


# bf16 -----------------------------------------------------------------------------------------------------------
BF16_TOL = 1e-2  # bf16 keeps 8 significant bits (relative rounding 2^-9): mean losses follow float32's closely


def _bf16_runs(ctx: Ctx) -> dict[str, list[str]]:
    common = ("trainer.compile=false", "regularize.dropout=0", "trainer.tf32=false")
    return {"fp32": ctx.overrides(*common, "amp=off"), "bf16": ctx.overrides(*common, "amp=bf16")}


@check(f"bf16 autocast follows float32 (train losses within {BF16_TOL:g} relative), and a Linear computes in bf16",
       lambda ctx: [train_py(o, ctx.work("bf16_autocast") / k) for k, o in _bf16_runs(ctx).items()])
def check_bf16_autocast(ctx: Ctx) -> dict[str, Any]:
    runs = {k: train(o, ctx.work("bf16_autocast") / k) for k, o in _bf16_runs(ctx).items()}
    fp32, bf16 = (runs[k].log.series("train/loss") for k in ("fp32", "bf16"))
    p = runs["bf16"].trainer.p
    seen: list[torch.dtype] = []
    linear = next(m for m in p.model.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad(), p.autocast:
        p.task.loss(p.model, p.task.train_batch(p.sampler.indices(0)))
    hook.remove()
    diff = max_rel_diff(fp32, bf16)
    first, last = min(bf16), max(bf16)
    figures = {"fp32 loss": round(fp32[last], 4), "bf16 loss": round(bf16[last], 4),
               "max rel diff": f"{diff:.2e}", "linear dtype": str(seen[0]).removeprefix("torch.")}
    if seen[0] != torch.bfloat16:
        raise Failed(f"a Linear under the run's autocast computed in {seen[0]}, not bfloat16", figures)
    if not bf16[last] < bf16[first]:
        raise Failed(f"the bf16 run did not learn: loss {bf16[first]:.4f} at step {first}, {bf16[last]:.4f} at "
                     f"step {last}", figures)
    if diff > BF16_TOL:
        raise Failed(f"bf16 losses differ from float32's by {diff:.2e} relative (> {BF16_TOL:g})", figures)
    return figures


# fp16 + GradScaler -------------------------------------------------------------------------------------------------
class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows at any loss scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


def overflow_at(calls: set[int]) -> Callable:
    """A parts tweak: the task's n-th loss computations (1-based, redone attempts count) for n in `calls` get an
    infinite gradient. Counted on the host: no synchronisation."""

    def tweak(parts):
        task, loss, count = parts.task, parts.task.loss, [0]

        def poisoned(model, batch):
            out = loss(model, batch)
            count[0] += 1
            return _InfiniteGradient.apply(out) if count[0] in calls else out

        task.loss = poisoned
        return parts

    return tweak


FP16_INIT_SCALE = 2.0**12  # low enough that this model's gradients never overflow by themselves: every skip is ours


def fp16_parts(ctx: Ctx, then: Callable | None = None) -> Callable:
    """On CUDA the config's amp=fp16 builds the fp16 autocast; on a CPU (where the config refuses amp=fp16 for users)
    it is set by hand. The GradScaler (torch.amp.GradScaler(device)) starts at FP16_INIT_SCALE."""

    def tweak(parts):
        if not ctx.cuda:
            parts = replace(parts, autocast=torch.autocast("cpu", dtype=torch.float16))
        parts = replace(parts, scaler=torch.amp.GradScaler(ctx.device, init_scale=FP16_INIT_SCALE))
        return then(parts) if then else parts

    return tweak


FP16_BAD_STEP, FP16_OVERFLOWS = 4, 3


def fp16_steps(ctx: Ctx) -> int:
    return ctx.pick(20, 12)


def _fp16_runs(ctx: Ctx) -> dict[str, list[str]]:
    amp = "amp=fp16" if ctx.cuda else "amp=off"  # CPU: fp16 autocast and GradScaler("cpu") are set by hand
    common = ("trainer.compile=false", amp, f"trainer.max_steps={fp16_steps(ctx)}", "trainer.log_interval=4")
    return {"clean": ctx.overrides(*common), "overflow": ctx.overrides(*common),
            "bounded": ctx.overrides(*common, "trainer.fp16_max_retries=2", "trainer.nonfinite=raise",
                                  "trainer.max_nonfinite=1")}


@check(f"fp16 autocast + GradScaler: {FP16_OVERFLOWS} forced overflows at step {FP16_BAD_STEP} are redone (step and "
       "schedule do not advance, scale halves each time); past trainer.fp16_max_retries=2 the batch is given up as "
       "non-finite (fatal here: trainer.max_nonfinite=1)",
       lambda ctx: [train_py(o, ctx.work("fp16_grad_scaler") / k) + f"   # {k}" + (
           "" if k == "clean" else f": infinite gradient injected into step {FP16_BAD_STEP}'s attempts")
           + f"; GradScaler(init_scale={FP16_INIT_SCALE:g})"
           for k, o in _fp16_runs(ctx).items()])
def check_fp16_grad_scaler(ctx: Ctx) -> dict[str, Any]:
    from trainer.nonfinite import NonFiniteError

    runs, steps = _fp16_runs(ctx), fp16_steps(ctx)
    work = ctx.work("fp16_grad_scaler")
    first = FP16_BAD_STEP + 1  # the loss computation of step FP16_BAD_STEP (0-based)
    clean = train(runs["clean"], work / "clean", tweak=fp16_parts(ctx))
    hit = train(runs["overflow"], work / "overflow",
                tweak=fp16_parts(ctx, overflow_at(set(range(first, first + FP16_OVERFLOWS)))))
    n_clean, n_hit = (r.final.get("skipped_fp16_overflow", 0) for r in (clean, hit))
    s_clean, s_hit = (r.trainer.p.scaler.get_scale() for r in (clean, hit))
    figures = {"overflows": f"{n_hit} (clean run: {n_clean})", "step": hit.final["step"],
               "schedule step": hit.trainer.p.scheduler.last_step, "scale": f"{s_hit:g} (clean: {s_clean:g})",
               "train loss": f"{hit.log.series('train/loss')[steps]:.4f} "
                             f"(clean: {clean.log.series('train/loss')[steps]:.4f})"}
    if n_clean:
        raise Failed(f"the clean run overflowed {n_clean} times by itself at scale {FP16_INIT_SCALE:g}: the count "
                     "below would not be the injected overflows'", figures)
    if n_hit != FP16_OVERFLOWS:
        raise Failed(f"{FP16_OVERFLOWS} injected overflows, the scaler skipped {n_hit}", figures)
    if hit.final["step"] != steps or hit.trainer.p.scheduler.last_step != steps:
        raise Failed("the skipped attempts advanced the step counter or the schedule", figures)
    if s_clean != FP16_INIT_SCALE or s_hit != s_clean / 2**FP16_OVERFLOWS:
        raise Failed(f"the loss scale went to {s_hit:g}, expected {s_clean / 2**FP16_OVERFLOWS:g}", figures)
    if "skipped_nonfinite" in hit.final or not math.isfinite(hit.final["val_loss"]):
        raise Failed("a redone overflow counted as non-finite, or the run ended non-finite", figures)
    try:  # 3 attempts at the batch overflow; fp16_max_retries=2 allows 2 redos, then one non-finite step ends it
        train(runs["bounded"], work / "bounded", tweak=fp16_parts(ctx, overflow_at(set(range(first, first + 3)))))
    except NonFiniteError as e:
        if f"step {FP16_BAD_STEP}" not in str(e) or "3 fp16 attempts" not in str(e):
            raise Failed(f"the retry bound stopped the run with the wrong message: {e}", figures) from None
        figures["bound"] = "3 attempts -> non-finite (raise)"
    else:
        raise Failed("trainer.fp16_max_retries=2 did not stop a batch that overflowed 3 times", figures)
    return figures


# fused AdamW ------------------------------------------------------------------------------------------------------
FUSED_STEPS, FUSED_RTOL, FUSED_ATOL = 10, 1e-5, 1e-6


@check(f"fused AdamW (the recipe's) equals foreach AdamW on identical gradients after {FUSED_STEPS} steps "
       f"(rtol {FUSED_RTOL:g}, atol {FUSED_ATOL:g})",
       lambda ctx: [f"in this process: build({shlex.join(ctx.overrides('regularize.dropout=0'))}), the model "
                    "copied, torch.optim.AdamW(fused=True) and (foreach=True) stepped on the same gradients"])
def check_fused_adamw(ctx: Ctx) -> dict[str, Any]:
    from hydra.utils import instantiate

    from optim.param_groups import config_param_groups
    from trainer.build import build

    cfg = compose(ctx.overrides("regularize.dropout=0"))
    parts = build(cfg)
    fused = parts.optimizer
    if not (isinstance(fused, torch.optim.AdamW) and fused.defaults.get("fused")):
        raise Failed(f"the recipe's optimizer is {type(fused).__name__} with fused={fused.defaults.get('fused')}")
    twin = copy.deepcopy(parts.model)
    node = copy.deepcopy(cfg.optimizer)
    node.fused, node.foreach = False, True
    foreach = instantiate(node)(config_param_groups(twin, cfg.regularize))
    for a, b in zip(fused.param_groups, foreach.param_groups):  # the schedule is not stepped: both at the base LR
        a["lr"] = b["lr"] = a.get("initial_lr", a["lr"])
        differ = {k for k in a.keys() | b.keys() if k not in ("params", "fused", "foreach", "initial_lr")
                  and a.get(k) != b.get(k)}
        if differ or len(a["params"]) != len(b["params"]):
            raise Failed(f"the foreach twin's param group differs in {sorted(differ)}")
    start = [q.detach().clone() for q in parts.model.parameters()]
    model, task = parts.model, parts.task
    for step in range(FUSED_STEPS):
        loss = task.loss(model, task.train_batch(parts.sampler.indices(step))).mean()
        loss.backward()
        for a, b in zip(model.parameters(), twin.parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        fused.step()
        foreach.step()
        fused.zero_grad(set_to_none=True)
        foreach.zero_grad(set_to_none=True)
    pairs = list(zip(model.parameters(), twin.parameters()))
    diff = max((a - b).abs().max().item() for a, b in pairs)
    moved = max((a - s).abs().max().item() for a, s in zip(model.parameters(), start))
    figures = {"max abs diff": f"{diff:.2e}", "max movement": f"{moved:.2e}", "steps": FUSED_STEPS}
    if moved < 1e3 * FUSED_ATOL:
        raise Failed("the parameters hardly moved: the comparison would mean nothing", figures)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        try:
            torch.testing.assert_close(a, b, rtol=FUSED_RTOL, atol=FUSED_ATOL)
        except AssertionError as e:
            raise Failed(f"{name}: fused and foreach AdamW differ: {str(e).splitlines()[1:3]}", figures) from None
    return figures


# torch.compile --------------------------------------------------------------------------------------------------------
def compile_tol(ctx: Ctx) -> float:
    # float32 both ways; Inductor fuses and reorders reductions. CUDA: 1e-3, the replay's tolerance on a GPU.
    return 1e-3 if ctx.cuda else 1e-4


def _compile_runs(ctx: Ctx) -> dict[str, list[str]]:
    # dropout 0: compiled dropout draws its masks from another random stream than eager's
    steps, log = ctx.pick((20, 5), (8, 2))
    common = ("amp=off", "trainer.tf32=false", "regularize.dropout=0", f"trainer.max_steps={steps}",
              f"trainer.log_interval={log}")
    return {"eager": ctx.overrides(*common, "trainer.compile=false"),
            "compiled": ctx.overrides(*common, "trainer.compile=true")}


@check("torch.compile'd training follows eager training: train losses within 1e-3 relative on CUDA (1e-4 on CPU), "
       "float32",
       lambda ctx: [train_py(o, ctx.work("compile") / k) for k, o in _compile_runs(ctx).items()])
def check_compile(ctx: Ctx) -> dict[str, Any]:
    runs = {k: train(o, ctx.work("compile") / k) for k, o in _compile_runs(ctx).items()}
    eager, compiled = (runs[k].log.series("train/loss") for k in ("eager", "compiled"))
    diff, last = max_rel_diff(eager, compiled), max(eager)
    tol = compile_tol(ctx)
    figures = {"eager loss": round(eager[last], 5), "compiled loss": round(compiled[last], 5),
               "max rel diff": f"{diff:.2e}", "run s (eager/compiled)":
               f"{runs['eager'].seconds:.0f}/{runs['compiled'].seconds:.0f}"}
    if not hasattr(runs["compiled"].trainer.train_model, "_orig_mod"):
        raise Failed("trainer.compile=true did not compile the model", figures)
    if diff > tol:
        raise Failed(f"compiled losses differ from eager by {diff:.2e} relative (> {tol:g})", figures)
    return figures


# TF32 ---------------------------------------------------------------------------------------------------------------
def _matmul_error(n: int = 4096) -> tuple[float, float]:
    """(relative error against float64, TFLOP/s) of an n x n float32 matmul with the current TF32 setting."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=g)
    b = torch.randn(n, n, device="cuda", generator=g)
    ref = a.double() @ b.double()
    err = ((a @ b).double() - ref).norm().item() / ref.norm().item()
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return err, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


@check("trainer.tf32=true turns TF32 on for matmuls; off, a float32 matmul is float32-accurate (rel. error < 1e-5), "
       "on, it is TF32's (> 10x larger); TFLOP/s both ways",
       lambda ctx: [f"in this process: build({shlex.join(ctx.overrides('trainer.tf32=true'))}); a 4096^2 matmul "
                    "with torch.backends.cuda.matmul.allow_tf32 off and on"])
def check_tf32(ctx: Ctx) -> dict[str, Any]:
    if not ctx.cuda:
        raise Skipped("TF32 is a CUDA tensor-core format")
    from trainer.build import build

    torch.backends.cuda.matmul.allow_tf32 = False
    build(compose(ctx.overrides("trainer.tf32=true")))
    set_by_trainer = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    err_off, tflops_off = _matmul_error()
    torch.backends.cuda.matmul.allow_tf32 = True
    err_on, tflops_on = _matmul_error()
    figures = {"rel err off/on": f"{err_off:.1e}/{err_on:.1e}", "TFLOP/s off/on": f"{tflops_off:.0f}/{tflops_on:.0f}",
               "set by trainer": set_by_trainer}
    if not set_by_trainer:
        raise Failed("build() with trainer.tf32=true left torch.backends.cuda.matmul.allow_tf32 off", figures)
    if err_off > 1e-5:
        raise Failed(f"with TF32 off the float32 matmul's relative error is {err_off:.1e} (> 1e-5)", figures)
    if err_on < 10 * err_off:
        raise Failed("with TF32 on the matmul is as accurate as float32: TF32 kernels were not used", figures)
    return figures


# host synchronisations per step -------------------------------------------------------------------------------------
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def sync_guard(device: str) -> Iterator[Callable[[str], None]]:
    """A switch set_mode("error" | "default"). CUDA: torch.cuda.set_sync_debug_mode, so any synchronising call
    raises while on. CPU: there is no synchronisation to catch; Python-level host reads of a tensor (.item(),
    bool(), float(), ...), the usual way one creeps into a loop, raise instead."""
    if device == "cuda":
        try:
            yield torch.cuda.set_sync_debug_mode
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    on = [False]
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def guarded(name: str) -> Callable:
        def read(self, *args, **kwargs):
            if on[0]:
                raise RuntimeError(f"host read Tensor.{name}() during a training step (sync guard on)")
            return originals[name](self, *args, **kwargs)

        return read

    for name in _HOST_READS:
        setattr(torch.Tensor, name, guarded(name))
    try:
        yield lambda mode: on.__setitem__(0, mode == "error")
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def guarded_fit(set_mode: Callable[[str], None], from_step: int, record: list | None = None) -> Callable:
    """A fit() whose training steps from `from_step` on run with the guard on, and off at the loop's own sync
    points. The loop draws each step's batch indices first thing (sampler.indices) and calls guard.check first at
    every deliberate sync (log interval, evaluation, checkpoint, the end): those two are the switches."""

    def fit(trainer, log):
        sampler, indices, check_finite = trainer.p.sampler, trainer.p.sampler.indices, trainer.guard.check

        def step_begins(step):
            if step >= from_step:
                set_mode("error")
                if record is not None:
                    record.append(("error", step))
            return indices(step)

        def sync_point():
            set_mode("default")
            if record is not None:
                record.append(("default", trainer.step))
            return check_finite()

        sampler.indices, trainer.guard.check = step_begins, sync_point
        try:
            return trainer.fit(log)
        finally:
            set_mode("default")
            del sampler.indices, trainer.guard.check

    return fit


SYNC_STEPS, SYNC_LOG, SYNC_NAN_STEP = 60, 20, 45  # on a CPU: 12, 4, 9


def sync_steps(ctx: Ctx) -> tuple[int, int, int]:
    """(steps, log interval, the step whose loss is made NaN)"""
    return ctx.pick((SYNC_STEPS, SYNC_LOG, SYNC_NAN_STEP), (12, 4, 9))


def _sync_runs(ctx: Ctx) -> dict[str, list[str]]:
    steps, log, _ = sync_steps(ctx)
    common = ("amp=bf16", "trainer.nonfinite=raise", f"trainer.max_steps={steps}", f"trainer.log_interval={log}")
    return {"clean": ctx.overrides(*common), "nan": ctx.overrides(*common)}


def nan_at(call: int) -> Callable:
    """A parts tweak: the task's `call`-th loss (1-based) is NaN, made on the device (no host read)."""

    def tweak(parts):
        task, loss, count = parts.task, parts.task.loss, [0]

        def poisoned(model, batch):
            out = loss(model, batch)
            count[0] += 1
            return out * float("nan") if count[0] == call else out

        task.loss = poisoned
        return parts

    return tweak


@check(f"steps {SYNC_LOG}..{SYNC_STEPS} of the recipe (bf16, nonfinite=raise) run under "
       "torch.cuda.set_sync_debug_mode('error') except at the log intervals; a NaN injected at step "
       f"{SYNC_NAN_STEP} is reported at step {SYNC_STEPS} naming step {SYNC_NAN_STEP} (CPU: host reads instead)",
       lambda ctx: [train_py(o, ctx.work("host_syncs") / k) + f"   # {k}" + (
           f": NaN loss injected at step {sync_steps(ctx)[2]}" if k == "nan" else "")
           for k, o in _sync_runs(ctx).items()])
def check_host_syncs(ctx: Ctx) -> dict[str, Any]:
    from trainer.nonfinite import NonFiniteError

    runs, work = _sync_runs(ctx), ctx.work("host_syncs")
    steps, log, nan_step = sync_steps(ctx)
    with sync_guard(ctx.device) as set_mode:
        set_mode("error")  # the guard itself must catch a host read
        try:
            torch.ones(1, device=ctx.device).sum().item()
        except RuntimeError:
            pass
        else:
            raise Failed("the guard let a host read through: this check would prove nothing")
        finally:
            set_mode("default")
        record: list = []
        clean = train(runs["clean"], work / "clean", fit=guarded_fit(set_mode, log, record))
        guarded = sum(1 for mode, _ in record if mode == "error")
        figures = {"guarded steps": guarded, "train loss": round(clean.log.series("train/loss")[steps], 4)}
        if guarded != steps - log:
            raise Failed(f"{guarded} steps ran guarded, expected {steps - log}", figures)
        try:
            train(runs["nan"], work / "nan", tweak=nan_at(nan_step + 1), fit=guarded_fit(set_mode, log))
        except NonFiniteError as e:
            if f"at step {nan_step}" not in str(e):
                raise Failed(f"the injected NaN was reported with the wrong step: {e}", figures) from None
            figures["NaN"] = f"reported at step {-(-nan_step // log) * log}, names step {nan_step}"
        else:
            raise Failed(f"a NaN loss at step {nan_step} went unreported with nonfinite=raise", figures)
    return figures


# replay ---------------------------------------------------------------------------------------------------------------
def _replay_run(ctx: Ctx) -> list[str]:
    # the recipe as it is (bf16, fused AdamW, compile, TF32 on CUDA), with evaluations at 50 and 100
    steps, log, evaluate = ctx.pick((100, 10, 50), (20, 5, 10))
    return ctx.overrides(f"trainer.max_steps={steps}", f"trainer.log_interval={log}",
                         f"trainer.eval_interval={evaluate}")


def _replay_cmd(ctx: Ctx) -> list[str]:
    work = ctx.work("replay")
    return ["-m", "experiments.replay", str(work / "run"), "--out", str(work / "replay")]


@check("a short run of the recipe replays with python -m experiments.replay within its stated tolerance "
       "(relative 1e-3 on CUDA, bit for bit on CPU)",
       lambda ctx: [train_py(_replay_run(ctx), ctx.work("replay") / "run"), py(_replay_cmd(ctx))])
def check_replay(ctx: Ctx) -> dict[str, Any]:
    from experiments.replay import GPU_TOLERANCE, compare
    from trainer.run import run

    work = ctx.work("replay")
    run(compose(_replay_run(ctx)), work / "run")
    code, tail = run_command([ctx.python, *_replay_cmd(ctx)], work / "replay.log", timeout=1800)
    if code != 0 or not (work / "replay" / "replay.json").is_file():
        raise Failed(f"python -m experiments.replay exited {code}: {tail[-600:]}")
    verdict = json.loads((work / "replay" / "replay.json").read_text())
    expected = GPU_TOLERANCE if ctx.cuda else 0.0
    _, rows = compare(work / "run", work / "replay", 0.0)
    numeric = [(a, b) for _, a, b, _ in rows if isinstance(a, (int, float)) and isinstance(b, (int, float))]
    worst = max((abs(a - b) / max(abs(a), abs(b), 1e-30) for a, b in numeric), default=0.0)
    figures = {"values": verdict["compared"], "tolerance": verdict["tolerance"], "max rel diff": f"{worst:.1e}",
               "val_loss": round(json.loads((work / "run" / "final_metrics.json").read_text())["val_loss"], 4)}
    if verdict["tolerance"] != expected:
        raise Failed(f"the replay used tolerance {verdict['tolerance']}, the stated one is {expected}", figures)
    if not verdict["match"] or verdict["compared"] < 10:
        raise Failed(f"replay: match={verdict['match']} over {verdict['compared']} values", figures)
    return figures


# DDP --------------------------------------------------------------------------------------------------------------
def _ddp_args(ctx: Ctx) -> list[str]:
    # dropout off: DDP reseeds each rank's dropout stream after build (seed + rank), the single process does not
    steps, log = ctx.pick((30, 10), (12, 4))
    return ctx.overrides(f"trainer.max_steps={steps}", f"trainer.log_interval={log}", "regularize.dropout=0")


def _ddp_cmd(ctx: Ctx) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
            "trainer.strategy=ddp", *_ddp_args(ctx), f"hydra.run.dir={ctx.work('ddp') / 'ddp'}"]


@check("trainer.strategy=ddp under torchrun with one process (nccl on CUDA, gloo on CPU) logs the single-process "
       "run's losses (relative 1e-3 on CUDA, bit for bit on CPU)",
       lambda ctx: [py(_ddp_cmd(ctx)) + ("   # NCCL_DEBUG=INFO" if ctx.cuda else ""),
                    train_py(_ddp_args(ctx), ctx.work("ddp") / "single")])
def check_ddp(ctx: Ctx) -> dict[str, Any]:
    work = ctx.work("ddp")
    code, tail = run_command([ctx.python, *_ddp_cmd(ctx)], work / "ddp.log", timeout=1200,
                             env={"NCCL_DEBUG": "INFO"} if ctx.cuda else None)
    if code != 0:
        raise Failed(f"torchrun exited {code}: {tail[-600:]}")
    single = train(_ddp_args(ctx), work / "single")
    rows = [json.loads(line) for line in (work / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ddp = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    diff = max_rel_diff(single.log.series("train/loss"), ddp)
    backend = "nccl" if ctx.cuda else "gloo"
    figures = {"backend": backend, "max rel diff": f"{diff:.1e}", "train loss": round(ddp[max(ddp)], 4)}
    if ctx.cuda and "NCCL INFO" not in (work / "ddp.log").read_text(errors="replace"):
        raise Failed("no NCCL INFO line in torchrun's output: the process group did not use nccl", figures)
    tol = 1e-3 if ctx.cuda else 0.0
    if diff > tol:
        raise Failed(f"DDP's losses differ from the single process's by {diff:.1e} relative (> {tol:g})", figures)
    return figures


# throughput and memory ----------------------------------------------------------------------------------------------
def _speed_run(ctx: Ctx) -> list[str]:
    return ctx.overrides(*(("trainer.max_steps=300", "trainer.log_interval=50") if ctx.cuda else
                           ("trainer.max_steps=20", "trainer.log_interval=5")))


@check("tokens/s (median over log intervals, the first left out) and peak memory of the recipe's char-GPT "
       "(CPU: the small model, no memory figure)",
       lambda ctx: [train_py(_speed_run(ctx), ctx.work("throughput") / "run")])
def check_throughput(ctx: Ctx) -> dict[str, Any]:
    if ctx.cuda:
        gc.collect()  # what earlier checks left is freed, so the peak is this run's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    done = train(_speed_run(ctx), ctx.work("throughput") / "run")
    speeds = list(done.log.series("train/tokens_per_s").values())[1:]
    if not speeds or not all(math.isfinite(s) and s > 0 for s in speeds):
        raise Failed(f"no usable tokens/s figures were logged: {speeds}")
    t = done.trainer.p.cfg.task
    tokens_per_s = statistics.median(speeds)
    figures = {"tokens/s": f"{tokens_per_s:,.0f}", "ms/iter": f"{t.batch_size * t.block_size / tokens_per_s * 1e3:.1f}",
               "model": f"{t.n_layer}x{t.n_head}x{t.n_embd}, block {t.block_size}, batch {t.batch_size}"}
    if ctx.cuda:
        figures["peak MiB"] = f"{(torch.cuda.max_memory_allocated() - before) / 2**20:,.0f}"
    return figures


# the full recipe --------------------------------------------------------------------------------------------------
def _recipe_cmd(ctx: Ctx) -> list[str]:
    return ["train.py", f"recipe={RECIPE}", "trainer.progress=plain", f"hydra.run.dir={ctx.out / RECIPE}"]


@check(f"the full recipe={RECIPE}: wall time and val_loss against its expect block (<= 1.47 + 0.03); "
       "left out with --quick",
       lambda ctx: [py(_recipe_cmd(ctx))])
def check_recipe(ctx: Ctx) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not ctx.cuda:
        raise Skipped("the full recipe's figure is a GPU figure")
    if ctx.quick:
        raise Skipped("--quick")
    expect = OmegaConf.load(ROOT / "recipes" / f"{RECIPE}.yaml").expect
    limit = expect.target + expect.tolerance
    start = time.perf_counter()
    code, tail = run_command([ctx.python, *_recipe_cmd(ctx)], ctx.out / f"{RECIPE}.log", timeout=4 * 3600)
    wall = time.perf_counter() - start
    final_file = ctx.out / RECIPE / "final_metrics.json"
    if code != 0 or not final_file.is_file():
        raise Failed(f"train.py exited {code}: {tail[-600:]}", {"wall s": round(wall)})
    final = json.loads(final_file.read_text())
    figures = {"val_loss": round(final[expect.metric], 4), "limit": round(limit, 4), "wall s": round(wall),
               "train s": final.get("train_time_s"), "run dir": str(ctx.out / RECIPE)}
    if not final[expect.metric] <= limit:
        raise Failed(f"{expect.metric} {final[expect.metric]:.4f} > {limit:g}", figures)
    return figures


# -- the harness ----------------------------------------------------------------------------------------------------
@dataclass
class Result:
    check: str
    status: str  # ok | FAILED | skipped
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    commands: list[str] = field(default_factory=list)


@contextlib.contextmanager
def isolated(ctx: Ctx) -> Iterator[None]:
    """What one check changes globally is undone before the next: TF32 flags, the sync debug mode, compiled code."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
        torch.set_num_threads(flags[2])
        from torch import _dynamo

        _dynamo.reset()
        gc.collect()
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.empty_cache()


def run_check(c: Check, ctx: Ctx) -> Result:
    start = time.perf_counter()
    work = ctx.work(c.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        with isolated(ctx), open(work / "output.log", "a") as f, contextlib.redirect_stdout(f):
            figures = c.run(ctx)
        result = Result(c.name, "ok", time.perf_counter() - start, figures)
    except Skipped as e:
        result = Result(c.name, "skipped", time.perf_counter() - start, detail=str(e))
    except Failed as e:
        result = Result(c.name, "FAILED", time.perf_counter() - start, e.figures, str(e))
    except Exception as e:  # a crash is a failure of this check only
        (work / "traceback.txt").write_text(traceback.format_exc())
        result = Result(c.name, "FAILED", time.perf_counter() - start,
                        detail=f"{type(e).__name__}: {str(e).strip()[:400]} (traceback: {work / 'traceback.txt'})")
    result.commands = c.commands(ctx)
    if result.status == "FAILED":
        result.figures["kept"] = str(work)  # its runs and logs, for a look
    else:
        shutil.rmtree(work, ignore_errors=True)  # checkpoints of short runs
    return result


def environment(ctx: Ctx) -> dict[str, Any]:
    env = {"device": ctx.device, "torch": torch.__version__, "python": sys.version.split()[0],
           "threads": torch.get_num_threads()}
    if ctx.cuda:
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


def print_plan(ctx: Ctx, checks: list[Check]) -> None:
    print("CUDA is not available here: nothing was run. On a CUDA machine, `python -m bench.gpu_check` (or "
          "`make gpu-check`) runs these checks,")
    print(f"with data from KILN_DATA_ROOT={os.environ.get('KILN_DATA_ROOT', 'data')} and the results in "
          f"{ctx.out}/gpu_check.json (`--device cpu` runs the CPU-meaningful ones here). In the commands:")
    print(f"  S='{shlex.join(ctx.base())}'   # the recipe, short: evaluation and checkpoint only at the end")
    print(f"  O={ctx.out / 'work'}\n")
    for i, c in enumerate(checks, 1):
        print(f"{i:2d}. {c.name}: {c.what}")
        for line in c.commands(ctx):
            print(f"      {ctx.shorten(line)}")
    print("\n`python train.py ...` lines run in the checking process (its build() and Trainer: what that command "
          "runs); the other commands run as subprocesses from the repository root.")


def print_table(results: list[Result], env: dict[str, Any], out_file: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    where = env.get("gpu") or "CPU"
    table = Table(title=f"bench.gpu_check on {where} (torch {env['torch']})")
    for col in ("check", "status", "figures", "s"):
        table.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    colour = {"ok": "green", "FAILED": "bold red", "skipped": "yellow"}
    for r in results:
        figures = ", ".join(f"{k} {v}" for k, v in r.figures.items())
        if r.detail:
            figures = f"{figures}\n{r.detail}" if figures else r.detail
        table.add_row(r.check, f"[{colour[r.status]}]{r.status}[/]", escape(figures), f"{r.seconds:.0f}")
    console.print(table)
    failed = [r.check for r in results if r.status == "FAILED"]
    console.print(f"{len(results) - len(failed)} of {len(results)} not failed"
                  + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; results in {out_file}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: run on CUDA when it is available, else print the plan and exit 0")
    ap.add_argument("--quick", action="store_true", help=f"leave out the full {RECIPE} recipe")
    ap.add_argument("--out", type=Path, help="the JSON file to write (default: runs/gpu_check/<time>/gpu_check.json)")
    ap.add_argument("--only", help="comma-separated checks to run (default: all)")
    ap.add_argument("--skip", help="comma-separated checks to leave out")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (trainer.threads) with --device cpu")
    args = ap.parse_args(argv)

    names = [c.name for c in CHECKS]
    chosen: list[Check] = []
    for option in ("only", "skip"):
        unknown = [n for n in (getattr(args, option) or "").split(",") if n and n not in names]
        if unknown:
            ap.error(f"--{option}: unknown check(s) {', '.join(unknown)}; the checks are {', '.join(names)}")
    only = set(args.only.split(",")) if args.only else set(names)
    skip = set(args.skip.split(",")) if args.skip else set()
    chosen = [c for c in CHECKS if c.name in only and c.name not in skip]

    out_file = args.out or ROOT / "runs" / "gpu_check" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S") / "gpu_check.json"
    device = args.device
    if device == "auto" and not torch.cuda.is_available():
        plan_out = args.out.parent if args.out else Path("runs/gpu_check/TIME")
        print_plan(Ctx("cuda", plan_out, quick=args.quick), chosen)
        return 0
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            ap.error("--device cuda: CUDA is not available here (leave --device out for the plan, or --device cpu)")
        device = "cuda"
    ctx = Ctx(device, out_file.parent.resolve(), threads=args.threads, quick=args.quick)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    ctx.out.mkdir(parents=True, exist_ok=True)
    env = environment(ctx)
    results: list[Result] = []
    for c in chosen:
        print(f"[{len(results) + 1}/{len(chosen)}] {c.name} ...", flush=True)
        results.append(run_check(c, ctx))
        r = results[-1]
        print(f"    {r.status} in {r.seconds:.0f} s" + (f": {r.detail}" if r.detail else ""), flush=True)
        out_file.write_text(json.dumps({"environment": env, "checks": [r.__dict__ for r in results],
                                        "failed": sum(r.status == "FAILED" for r in results)}, indent=2) + "\n")
    with contextlib.suppress(OSError):
        (ctx.out / "work").rmdir()  # when no failure kept anything there
    print_table(results, env, out_file)
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
