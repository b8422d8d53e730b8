"""What a run reports: a rich progress bar on a terminal (plain lines elsewhere), TensorBoard, metrics.jsonl.

Nothing here runs per step except `advance`, which only moves a counter; values are read from the device
at log intervals, so logging never adds a host synchronisation to the hot path.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from torch.utils.tensorboard import SummaryWriter


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value}"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class RunLogger:
    """Console + TensorBoard + metrics.jsonl for one run directory."""

    def __init__(self, run_dir: Path, total_steps: int, progress: str = "auto", start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.console = Console(stderr=False)
        self.err = Console(stderr=True)
        if progress == "auto":
            progress = "rich" if self.console.is_terminal else "plain"
        if progress not in ("rich", "plain", "off"):
            raise ValueError(f"trainer.progress={progress!r}: use auto, rich, plain or off")
        self.mode, self.total_steps = progress, total_steps
        # TensorBoard and metrics.jsonl forget what an earlier process logged after the step this one starts from
        # (a resume in the same directory, or a fresh start where a killed run left rows but no checkpoint).
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step)
        jsonl = self.run_dir / "metrics.jsonl"
        if jsonl.is_file():
            kept = [r for r in jsonl.read_text().splitlines() if (_row_step(r) or 0) > 0
                    and _row_step(r) <= start_step]
            tmp = jsonl.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            tmp.replace(jsonl)
        self._jsonl = open(jsonl, "a")  # noqa: SIM115 (closed in close())
        self._start_time, self._start_step = time.perf_counter(), start_step
        self._progress: Progress | None = None
        if self.mode == "rich":
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                console=self.console, transient=False,
            )
            self._bar = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self._progress.start()

    # -- per step (cheap) ----------------------------------------------------------------------------------
    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._bar, completed=step)

    # -- at intervals -------------------------------------------------------------------------------------
    def scalars(self, step: int, values: dict[str, float], console: bool = False) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if not console:
            return
        parts = [fmt.format(values[k]) for k, fmt in _CONSOLE.items() if k in values]
        if self._progress is not None:
            self._progress.update(self._bar, completed=step, stats=" | ".join(parts))
        elif self.mode == "plain":
            elapsed = time.perf_counter() - self._start_time
            done = step - self._start_step
            eta = elapsed / done * (self.total_steps - step) if done else 0.0
            self.console.print(f"step {step}/{self.total_steps} | " + " | ".join(parts) + f" | eta {_duration(eta)}",
                               highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        if self.mode != "off":
            self.console.print(message, highlight=False, soft_wrap=True)

    def histograms(self, model: torch.nn.Module, step: int) -> None:
        """Parameter and gradient histograms per layer (long-tailed gradients show up here)."""
        for name, param in model.named_parameters():
            self.writer.add_histogram(f"params/{name}", param.detach().float().cpu(), step)
            if param.grad is not None:
                self.writer.add_histogram(f"grads/{name}", param.grad.detach().float().cpu(), step)

    def final_table(self, metrics: dict[str, Any], title: str = "final metrics") -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in metrics.items():
            table.add_row(k, _fmt(v) if isinstance(v, float) else str(v))
        if self.mode != "off":
            self.console.print(table)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self.writer.close()
        self._jsonl.close()


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line cut short by a kill mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


_CONSOLE = {"train/epoch": "epoch {:.2f}", "train/loss": "loss {:.4g}", "train/lr": "lr {:.2e}",
            "train/samples_per_s": "{:,.0f} samples/s"}


def print_error(message: str) -> None:
    _print_prefixed("error: ", "bold red", message)


def print_warning(message: str) -> None:
    """Something odd that still runs (config/ oddities, a key repeated on the command line)."""
    _print_prefixed("warning: ", "bold yellow", message)


def _print_prefixed(prefix: str, style: str, message: str) -> None:
    """The message as plain text: rich markup would swallow `[norm,norm]` and the like."""
    Console(stderr=True).print(Text.assemble((prefix, style), message), highlight=False, soft_wrap=True)
    sys.stderr.flush()


class NullLogger:
    """What ranks other than 0 log: nothing."""

    writer = None

    def advance(self, step: int) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float], console: bool = False) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def histograms(self, model: Any, step: int) -> None:
        pass

    def final_table(self, metrics: dict[str, Any], title: str = "final metrics") -> None:
        pass

    def close(self) -> None:
        pass
