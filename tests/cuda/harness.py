"""Short runs of the GPU recipe (recipe=char_transformer_gpu) through the trainer's public API, on a CUDA GPU or on
a CPU (a small model there), with a logger that keeps every row: what the tests in tests/cuda/ train with."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, compose_cfg, need_data
from tests.toy import InfiniteGradient
from trainer.build import build
from trainer.loop import Trainer

RECIPE = "char_transformer_gpu"
# Every test runs on the CPU (the normal suite) and on CUDA (marked cuda: `make gpu-check`), unless it says otherwise.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# No evaluation or checkpoint until the end, a small fixed validation set, no sample text.
SHORT = ["trainer.eval_interval=0", "trainer.checkpoint_interval=0", "trainer.histogram_interval=0",
         "trainer.pictures=false", "trainer.progress=off", "task.eval_batches=4", "task.sample_chars=0"]
# On a CPU the recipe's model shrinks to something that trains in seconds.
CPU_MODEL = ["task.block_size=32", "task.batch_size=8", "task.n_layer=2", "task.n_head=2", "task.n_embd=64",
             "task.eval_batch_size=16", "task.eval_batches=2", "trainer.compile=false", "trainer.threads=1"]


def pick(device: str, cuda: Any, cpu: Any) -> Any:
    """A figure for this device: CPU runs are shorter (the path is exercised; the GPU figures are the point)."""
    return cuda if device == "cuda" else cpu


def overrides(device: str, *extra: str) -> list[str]:
    """A short run of the GPU recipe on `device`, then `extra` (a later key wins, as on train.py's command line)."""
    need_data()  # the char-GPT trains on tinyshakespeare
    steps, log, warmup = pick(device, (40, 10, 10), (20, 5, 2))
    base = [f"recipe={RECIPE}", f"trainer.device={device}", f"trainer.max_steps={steps}",
            f"trainer.log_interval={log}", f"schedule.warmup={warmup}", *SHORT]
    return [*base, *(CPU_MODEL if device == "cpu" else []), *extra]


class Recorder:
    """A logger that keeps every logged row in memory (and prints nothing); `on_advance(step)` after each step."""

    writer = None

    def __init__(self, on_advance: Callable[[int], None] | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.on_advance = on_advance

    def advance(self, step: int) -> None:
        if self.on_advance is not None:
            self.on_advance(step)

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
    trainer: Trainer
    seconds: float


def train(args: list[str], run_dir: Path, tweak: Callable | None = None, log: Recorder | None = None) -> Trained:
    """build() -> (tweak the parts) -> Trainer -> fit: what `python train.py <args>` runs, logging into a Recorder."""
    start = time.perf_counter()
    parts = build(compose_cfg(*args))
    trainer = Trainer(tweak(parts) if tweak else parts, run_dir)
    log = log or Recorder()
    final = trainer.fit(log)
    return Trained(final, log, trainer, time.perf_counter() - start)


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys() and a, f"the runs logged different steps: {sorted(a)} vs {sorted(b)}"
    return max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-30) for k in a)


def run_command(args: list[str], log_file: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """`python <args>` in the repository root, output into `log_file`; its output, asserting exit status 0."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        code = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, env={**os.environ, **(env or {})}).returncode
    text = log_file.read_text(errors="replace")
    assert code == 0, f"python {' '.join(args)} exited {code}: {text[-1500:]}"
    return text


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- parts tweaks: faults injected through the task's loss (the task protocol), counted on the host -----------------


def poison_loss(calls: set[int], how: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A parts tweak: the task's n-th loss computations (1-based, redone attempts count) for n in `calls` go
    through `how`. Counted on the host: no synchronisation."""

    def tweak(parts):
        loss, count = parts.task.loss, [0]

        def poisoned(model, batch):
            out = loss(model, batch)
            count[0] += 1
            return how(out) if count[0] in calls else out

        parts.task.loss = poisoned
        return parts

    return tweak


def overflow_at(calls: set[int]) -> Callable:
    return poison_loss(calls, InfiniteGradient.apply)


def nan_at(call: int) -> Callable:
    return poison_loss({call}, lambda out: out * float("nan"))  # made on the device: no host read


def fp16(device: str, init_scale: float, then: Callable | None = None) -> Callable:
    """On CUDA the config's amp=fp16 builds the fp16 autocast; on a CPU (where the config refuses amp=fp16 for
    users) it is set by hand. The GradScaler (torch.amp.GradScaler(device)) starts at `init_scale`."""

    def tweak(parts):
        if device == "cpu":
            parts = dataclasses.replace(parts, autocast=torch.autocast("cpu", dtype=torch.float16))
        parts = dataclasses.replace(parts, scaler=torch.amp.GradScaler(device, init_scale=init_scale))
        return then(parts) if then else parts

    return tweak


# -- host synchronisations --------------------------------------------------------------------------------------
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


def guarded_steps(set_mode: Callable[[str], None], from_step: int, log_every: int,
                  record: list | None = None) -> tuple[Callable, Recorder]:
    """(a parts tweak, a logger): training steps from `from_step` on run with the guard on, off at the log
    intervals. A step begins when the loop draws its batch indices (sampler.indices); it ends at the logger's
    advance(step), which the loop calls after the update and before the interval's deliberate host sync."""

    def tweak(parts):
        indices = parts.sampler.indices

        def step_begins(step):
            if step >= from_step:
                set_mode("error")
                if record is not None:
                    record.append(step)
            return indices(step)

        parts.sampler.indices = step_begins
        return parts

    def step_ends(step):
        if step % log_every == 0:
            set_mode("default")

    return tweak, Recorder(on_advance=step_ends)
