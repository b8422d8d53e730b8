"""compare_toy's regression task with a signal at a chosen moment, for testing Ctrl-C / SIGTERM / SIGKILL handling.

`task.signal_at="<phase>:<signal>:<marker file>"` picks the moment; it fires once (the marker file records it, so
later trials and resumes run normally). Phases: `setup` (start-up), `step<n>` (the n-th training batch drawn; the
signal is sent twice: a second Ctrl-C), `kill<n>` (the n-th batch drawn, once), `final` (test metrics, the run's
final phase: the signal is sent to this process) and `wait_final` (the final phase waits, up to a minute, for a
signal from outside, after writing `<marker file>.waiting` as a sign that it is there).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.experiments.compare_toy import Regression


class SelfSignalling(Regression):
    drawn = 0

    def __init__(self, signal_at: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.signal_at = signal_at

    def _armed(self, phase: str) -> tuple[int, Path] | None:
        if not self.signal_at:
            return None
        at, name, marker = self.signal_at.split(":", 2)
        if at != phase:
            return None
        try:  # the first to create the marker fires (two worker processes may get here at once)
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return None
        return getattr(signal, name), Path(marker)

    def setup(self, device):
        if armed := self._armed("setup"):
            os.kill(os.getpid(), armed[0])
        super().setup(device)

    def train_batch(self, indices):
        SelfSignalling.drawn += 1
        for phase, times in ((f"step{SelfSignalling.drawn}", 2), (f"kill{SelfSignalling.drawn}", 1)):
            if armed := self._armed(phase):
                for _ in range(times):
                    os.kill(os.getpid(), armed[0])
        return super().train_batch(indices)

    def final_metrics(self, model):
        if armed := self._armed("final"):
            os.kill(os.getpid(), armed[0])
        elif armed := self._armed("wait_final"):
            _wait_for_signal(*armed)
        return super().final_metrics(model)


def _wait_for_signal(signum: int, marker: Path) -> None:
    """Write `<marker>.waiting`, then wait until `signum` arrives (the trainer's own handler still sees it)."""
    got = []
    previous = signal.getsignal(signum)

    def handler(s, frame):
        got.append(s)
        if callable(previous):
            previous(s, frame)

    signal.signal(signum, handler)
    try:
        marker.with_name(marker.name + ".waiting").touch()
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        signal.signal(signum, previous)
