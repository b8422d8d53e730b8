"""The report's PNG figures (matplotlib, Agg): learning curves with a band over seeds, learning-rate sensitivity,
the final metric per seed (paired), and the share of runs that reached the target over training time."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from core import figures
from experiments.compare.plan import Plan
from experiments.compare.runs import Result
from experiments.compare.tuning import Tuning


def draw(out: Path, plan: Plan, a: Any, tuning: dict[str, Tuning] | None,
         finals: dict[str, list[Result]]) -> dict[str, str]:
    """Write the figures into `out`; return {name: file name} for those that have data."""
    colours = {o.label: colormaps["tab10"](i % 10) for i, o in enumerate(plan.options)}
    written: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        written[name] = figures.save(fig, out / f"{name}.png", dpi=110).name

    m = plan.metric
    # Learning curves: the mean over seeds and its min-max band, on the common evaluation steps.
    if any(a.curves.get(o.label) for o in plan.options):
        fig, ax = figures.subplots(figsize=(7.5, 4.5))
        for o in plan.options:
            curves = list(a.curves.get(o.label, {}).values())
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c.steps) for c in curves)))
            grid = np.array([[dict(zip(c.steps, c.values, strict=True))[s] for s in steps] for c in curves])
            ax.plot(steps, grid.mean(0), color=colours[o.label], label=f"{o.label} ({len(curves)} seeds)")
            ax.fill_between(steps, grid.min(0), grid.max(0), color=colours[o.label], alpha=0.2, linewidth=0)
        if a.target is not None:
            ax.axhline(a.target, color="grey", linestyle=":", linewidth=1, label="target")
        _zoom(ax, [v for cs in a.curves.values() for c in cs.values() for v in c.values], plan.mode)
        ax.set(xlabel="optimizer step", ylabel=f"validation {m}", title=f"learning curves ({plan.axis})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "learning_curves")

    # LR sensitivity: every rung-0 trial's final metric against its learning rate.
    if tuning:
        fig, ax = figures.subplots(figsize=(7.5, 4.5))
        finite = [r.value for t in tuning.values() for (rung, _), r in t.trials.items()
                  if rung == 0 and r.value is not None and math.isfinite(r.value)]
        top = _zoom(ax, finite, plan.mode)
        for o in plan.options:
            t = tuning[o.label]
            pts = sorted((r.trial.lr, r.value) for (rung, _), r in t.trials.items() if rung == 0 and r.trial.lr)
            ok = [(x, y) for x, y in pts if y is not None]
            bad = [x for x, y in pts if y is None]
            if ok:
                ax.plot(*zip(*ok, strict=True), marker="o", color=colours[o.label], label=o.label)
            if bad and top is not None:
                ax.scatter(bad, [top] * len(bad), marker="x", color=colours[o.label])
            chosen = [r for (rung, p), r in t.trials.items() if p == t.chosen and r.value is not None]
            if chosen:
                best = min(chosen, key=lambda r: r.trial.steps)  # its rung-0 point, on this plot's budget
                ax.scatter([best.trial.lr], [best.value], marker="*", s=180, color=colours[o.label],
                           edgecolor="black", zorder=5)
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel=f"final validation {m} after {plan.rungs[0]} steps",
               title="learning-rate sensitivity (rung 0, 1/9 of the budget)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        save(fig, "lr_sensitivity")

    # Final metric per seed, the runs of one seed joined across options.
    if any(r.per_seed for r in a.rows):
        fig, ax = figures.subplots(figsize=(max(5.0, 1.2 * len(plan.options) + 2), 4.5))
        labels = [o.label for o in plan.options]
        for s in plan.seeds:
            xs = [i for i, r in enumerate(a.rows) if s in r.per_seed]
            ax.plot(xs, [a.rows[i].per_seed[s] for i in xs], color="grey", alpha=0.35, linewidth=1)
        for i, r in enumerate(a.rows):
            ys = list(r.per_seed.values())
            ax.scatter([i] * len(ys), ys, color=colours[r.option], zorder=3)
            if r.val.n > 1:
                ax.errorbar([i + 0.15], [r.val.mean], yerr=[[r.val.mean - r.val.low], [r.val.high - r.val.mean]],
                            fmt="_", color="black", capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set(ylabel=f"final validation {m}", title="final runs per seed (bar: mean and 95% CI)")
        ax.grid(alpha=0.3, axis="y")
        save(fig, "final_per_seed")

    # Time to target: the share of final runs that reached the target by each training time.
    if a.target is not None and any(r.hits for r in a.rows):
        fig, ax = figures.subplots(figsize=(7.5, 4.5))
        horizon = max([h.seconds for r in a.rows for h in r.hits.values() if math.isfinite(h.seconds)] + [1.0])
        for r in a.rows:
            times = sorted(h.seconds for h in r.hits.values() if math.isfinite(h.seconds))
            n = max(1, len(r.hits))
            xs = [0.0, *times, horizon * 1.05]
            ys = [0.0, *[(i + 1) / n for i in range(len(times))], len(times) / n]
            ax.step(xs, ys, where="post", color=colours[r.option], label=f"{r.option} ({len(times)}/{n})")
        xlabel = ("training seconds (evaluation excluded)" if "time/train_s" in a.seconds_source else
                  "seconds, estimated from the step (evaluation included)")
        ax.set(xlabel=xlabel, ylabel="share of runs at the target",
               title=f"time to target: {m} {'<=' if plan.mode == 'min' else '>='} {a.target:.5g}", ylim=(-0.02, 1.05))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "time_to_target")
    return written


def _zoom(ax: Any, values: list[float], mode: str) -> float | None:
    """Keep the interesting range in view: an early loss of 500 would flatten curves that end near 100."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)])
    if len(v) == 0:
        return None
    lo, hi = np.percentile(v, 0), np.percentile(v, 90) if mode == "min" else np.percentile(v, 100)
    if mode == "max":
        lo = np.percentile(v, 10)
    pad = 0.05 * (hi - lo or abs(hi) or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    return float(hi + pad * 0.5) if mode == "min" else float(lo - pad * 0.5)
