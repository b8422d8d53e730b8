"""Durations in a config: steps (int), epochs ("3ep"), a percentage ("5%") or a fraction of the run (a float in
[0, 1]), parsed by core.config.parse_duration (the schema's duration type uses the same parser); and the horizon."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import parse_duration


def total_steps(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int | None) -> int | None:
    """The run's length: max_steps, else max_epochs x steps per epoch (None when that is not known)."""
    if max_steps is None and max_epochs is None:
        raise ValueError("trainer.max_steps=null, trainer.max_epochs=null: set one of them (an int >= 1)")
    if max_steps is not None:
        return max_steps
    return max_epochs * steps_per_epoch if max_epochs is not None and steps_per_epoch is not None else None


@dataclass(frozen=True)
class Horizon:
    total_steps: int
    steps_per_epoch: int

    @classmethod
    def for_run(cls, max_steps: int | None, max_epochs: float | None, steps_per_epoch: int) -> Horizon:
        """The run's length: trainer.max_steps, else trainer.max_epochs epochs (the config states one of them)."""
        return cls(total_steps=int(total_steps(max_steps, max_epochs, steps_per_epoch)),
                   steps_per_epoch=steps_per_epoch)

    def steps(self, duration: int | float | str | None) -> int:
        """Convert a duration to optimizer steps. 0/None: zero; "2ep": two epochs; 0.05: 5% of the run."""
        if duration is None:
            return 0
        amount, unit = parse_duration(duration)
        if unit == "epochs":
            return round(amount * self.steps_per_epoch)
        return round(amount * self.total_steps) if unit == "fraction" else int(amount)
