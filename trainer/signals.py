"""SIGTERM / SIGINT: the handler a run installs, and Interrupted, the error that ends the run with 128 + signal."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core.errors import UserError
from trainer.checkpoint import CheckpointDir


class Interrupted(UserError):
    """SIGTERM / SIGINT: the run stopped (after a checkpoint, unless it says otherwise). Exit code 128 + signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run (train.py's own, with trainer.resume=<run dir>)."""
    args = [a for a in sys.argv[1:] if not a.startswith("trainer.resume=")]
    return shlex.join(["python", Path(sys.argv[0]).name, *args, f"trainer.resume={run_dir}"])


def resume_hint(run_dir: Path, once: str = "") -> str:
    """Where a run stopped without a checkpoint of its step continues from (`once`: what must happen first)."""
    last = CheckpointDir(run_dir / "checkpoints").step_files()
    if not last:
        return f"no checkpoint was written before it: {once}run the same command again."
    then = f"{once[:1].upper()}{once[1:]}resume" if once else "Resume"
    return f"the last checkpoint is {last[-1]}. {then} with:\n  {resume_command(run_dir)}"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[SimpleNamespace]:
    """SIGTERM / SIGINT during a run. While it trains (`stop.trainer` set), the first signal sets `trainer.signal`:
    the step in progress finishes, a checkpoint is written, the run exits with 128 + signal (143 / 130); so does the
    final phase (see Trainer.fit). Before training begins, after the run finished (`stop.finished`), and at a second
    signal, the run stops at once: an Interrupted error, one paragraph, no traceback."""
    stop = SimpleNamespace(trainer=None, finished=False)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    signums = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum: int, frame: Any) -> None:
        trainer = stop.trainer
        if trainer is not None and trainer.signal is None and not stop.finished:
            trainer.signal = signum
            return
        name = signal.Signals(signum).name
        if stop.finished:
            why = (f"stopped by {name} after the run finished (final_metrics.json and its last checkpoint are "
                   "written): nothing is lost.")
        elif trainer is None:
            why = (f"stopped by {name} before training began: nothing was trained, and a checkpoint being resumed "
                   "from is untouched. Run the same command again.")
        else:
            why = f"stopped at once by a second {name} at step {trainer.step}, without a checkpoint of it; " + \
                resume_hint(trainer.run_dir)
        raise Interrupted(why, signum)

    for s in signums:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s in signums:
            signal.signal(s, previous[s])
