"""Durations in a config: steps (int), epochs ("3ep"), or a fraction of the run (a float in [0, 1])."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Horizon:
    total_steps: int
    steps_per_epoch: int

    @classmethod
    def for_run(cls, max_steps: int | None, max_epochs: float | None, steps_per_epoch: int) -> Horizon:
        """The run's length: trainer.max_steps, else trainer.max_epochs epochs (the config states one of them)."""
        total = max_steps if max_steps is not None else max_epochs * steps_per_epoch
        return cls(total_steps=int(total), steps_per_epoch=steps_per_epoch)

    def steps(self, duration: int | float | str | None) -> int:
        """Convert a duration to optimizer steps. 0/None: zero; "2ep": two epochs; 0.05: 5% of the run."""
        if duration is None:
            return 0
        if isinstance(duration, str):
            text = duration.strip()
            if text.endswith("ep"):
                return round(float(text[:-2]) * self.steps_per_epoch)
            if text.endswith("%"):
                return round(float(text[:-1]) / 100 * self.total_steps)
            try:
                return self.steps(float(text) if "." in text else int(text))
            except ValueError:
                raise ValueError(f"duration {duration!r}: use steps (100), epochs ('2ep') "
                                 "or a fraction (0.05)") from None
        if isinstance(duration, bool) or duration < 0:
            raise ValueError(f"duration {duration!r} must be a non-negative number of steps, epochs "
                             "or a fraction")
        if isinstance(duration, float):
            if duration > 1:
                raise ValueError(f"duration {duration}: a float is a fraction of the run and must be <= 1 "
                                 "(write an int for steps, or '2ep' for epochs)")
            return round(duration * self.total_steps)
        return int(duration)
