"""Draw the LR curve of a composed config: `python -m experiments.schedule_plot schedule=<name> [out=x.png]`.

Composes the real config (conf/, as train.py would, any override allowed), builds the schedule for the run's
horizon and writes a PNG of optimizer.lr x multiplier for every update. No data is loaded: the horizon is
trainer.max_steps, or trainer.max_epochs x steps_per_epoch (option `steps_per_epoch=N`; for the MNIST tasks
it defaults to (60000 - task.val_size) // task.batch_size, what the trainer's sampler uses). Options of this
command (not config keys): out=<path.png> (default schedule_<name>.png), steps_per_epoch=<N>.
A metric-driven schedule (plateau) is drawn without observations, so its curve is flat after warmup.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from core import figures
from core.config import compose
from schedules.horizon import Horizon, total_steps

OPTIONS = ("out", "steps_per_epoch")


def compose_config(overrides: list[str]) -> tuple[DictConfig, str]:
    """The config `python train.py <overrides>` would run, and the name of its schedule option."""
    cfg = compose(overrides, hydra=True)
    name = str(cfg.hydra.runtime.choices.get("schedule", "schedule"))
    return cfg, name


def horizon_of(cfg: DictConfig, steps_per_epoch: int | None) -> Horizon:
    t = cfg.trainer
    if steps_per_epoch is None:
        task = OmegaConf.to_container(cfg.task, resolve=True)
        n = get_object(task["_target_"]).train_size_of(task)
        if n is None:
            raise SystemExit("schedule_plot: give steps_per_epoch=<N> (optimizer steps per epoch of "
                             f"{cfg.task.get('_target_')}); it is only known by default for the MNIST tasks")
        steps_per_epoch = n // int(cfg.task.batch_size)
    try:
        total = total_steps(t.max_steps, t.max_epochs, steps_per_epoch)
    except ValueError as e:
        raise SystemExit(f"schedule_plot: {e}") from None
    return Horizon(total_steps=int(total), steps_per_epoch=int(steps_per_epoch))


def plot(overrides: list[str], out: str | Path | None = None, steps_per_epoch: int | None = None) -> Path:
    """Compose, build the schedule, write the PNG; returns its path."""
    cfg, name = compose_config(overrides)
    horizon = horizon_of(cfg, steps_per_epoch)
    try:
        schedule = instantiate(cfg.schedule)(horizon)
    except Exception as e:
        cause = e.__cause__ or e
        raise SystemExit(f"schedule_plot: schedule: {type(cause).__name__}: {cause}") from None
    base_lr = float(cfg.optimizer.get("lr", 1.0))
    steps = range(horizon.total_steps)
    lrs = [base_lr * schedule(t) for t in steps]

    title = f"schedule={name}: {horizon.total_steps} steps, {horizon.steps_per_epoch} per epoch"
    if hasattr(schedule, "observe"):
        title += ("\n(metric-driven: drawn with no observations, so flat after any warmup; it drops on a "
                  f"plateau of {cfg.schedule.get('monitor', 'the monitor')})")
    options = ", ".join(f"{k}={v}" for k, v in cfg.schedule.items() if k not in ("_target_", "_partial_"))
    if options:
        title += "\n" + "\n".join(textwrap.wrap(options, 100))
    fig, ax = figures.subplots(figsize=(8, 4.5))
    ax.plot(list(steps), lrs, lw=1.5)
    ax.set(xlabel="optimizer step", ylabel=f"lr (optimizer.lr={base_lr:g} x multiplier)",
           xlim=(0, max(1, horizon.total_steps - 1)), ylim=(0, max(lrs + [base_lr]) * 1.05))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return figures.save(fig, Path(out) if out else Path(f"schedule_{name}.png"), dpi=100)


def main(argv: list[str] | None = None) -> Path:
    args = list(sys.argv[1:] if argv is None else argv)
    ours = [a for a in args if "=" in a and a.split("=", 1)[0] in OPTIONS]
    opts = dict(a.split("=", 1) for a in ours)
    overrides = [a for a in args if a not in ours]
    spe = opts.get("steps_per_epoch")
    out = plot(overrides, opts.get("out"), int(spe) if spe else None)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
