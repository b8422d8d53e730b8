"""The plan of a comparison: the compared axis and its options, each option's composed config, the step budget and
its rungs, the learning-rate grid, the seeds, and the command line of every trial.

The command line is train.py's plus flags. Exactly one argument lists several values in Hydra's override grammar
(`optimizer=adamw,lion`, `regularize.dropout=0,0.1,0.25`): that is the compared axis, a config group or any key.
Every other argument is an ordinary override applied to every run. Each option is composed exactly as
`python train.py <overrides>` composes it (Hydra's compose API, the axis replaced by the option in place), so a
recipe's values apply to each option as they would in a plain run, and every option is checked by the config
validator (config/) before anything runs: all problems of all options are reported at once.

A trial's command line is the user's overrides with the option, then the protocol's keys: `trainer.max_steps`
(its rung's length), `trainer.seed`, the tuned `optimizer.lr` and `--tune` keys, and (unless the user set them)
`trainer.eval_interval` in steps of the full run, so every option and every rung is evaluated at the same steps,
plus `trainer.checkpoint_interval=0 trainer.pictures=false trainer.histogram_interval=0` (nothing compare reads),
and the option's schedule (and weight averaging) durations in steps or epochs as fractions of the full run
(scaled_schedule), so that every rung trial is a scaled copy of the full run.
Trial configs are the option's composed config with these keys set through the same override parser Hydra uses,
which gives the same config (and ledger key) as composing the whole command line (tests check it) at a fraction
of the cost.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from config import problems, unresolvable
from config.cli import unknown_keys
from core.config import groups
from core.config import options as group_options
from core.errors import ConfigError
from core.messages import did_you_mean, reason
from core.sampler import SAMPLERS
from schedules import Horizon

ROOT = Path(__file__).resolve().parents[2]
LR_KEY = "optimizer.lr"
GRID = tuple(range(-4, 5))  # LR exponents in half-decades: 9 points, 10^-2 .. 10^2 x the option's own default
EXTRA_POINTS = 2  # rung 0 adds 2 points: past the grid's edge when the best is there, else either side of the best
ETA = 3  # successive halving keeps the best 1/ETA of each rung
RUNG_FRACTIONS = (1 / 9, 1 / 3, 1.0)
PROTOCOL_KEYS = ("trainer.max_steps", "trainer.seed", LR_KEY)  # a user's value becomes the budget / seed / LR default
ECONOMY = {"trainer.checkpoint_interval": "0", "trainer.pictures": "false", "trainer.histogram_interval": "0"}
# Every key the protocol sets in a trial after the user's overrides (Plan.overrides), and why: a value given for
# one of them is overwritten in every trial, so none can be the compared axis or a --tune key. trainer.max_epochs
# is one because trainer.max_steps, set in every trial, takes its place.
PER_TRIAL = {
    "trainer.max_steps": "each rung's budget in steps",
    "trainer.max_epochs": "trainer.max_steps, each rung's budget, replaces it",
    "trainer.seed": "the paired seeds",
    LR_KEY: "the learning rate it tunes for every option",
    "trainer.eval_interval": "the same evaluation steps for every option and rung; --evals sets how many",
    **{k: f"{k}={v}: nothing compare reads" for k, v in ECONOMY.items()},
}


def lr_multiplier(k: float) -> float:
    """Grid position k (half-decades) -> the factor on the option's default learning rate."""
    return 10.0 ** (k / 2)


@dataclass
class Option:
    label: str  # the value on the command line ("lion")
    override: str  # "optimizer=lion"
    cfg: DictConfig  # composed as train.py would
    default_lr: float | None
    steps_per_epoch: int = 0  # its own: an axis such as task.batch_size changes it
    scaled: list[str] = field(default_factory=list)  # its schedule's step/epoch durations as fractions of the run


@dataclass
class Plan:
    axis: str
    options: list[Option]
    baseline: Option
    shared: list[str]  # the user's overrides, the axis, budget, seed and LR taken out
    protocol: list[str]  # eval cadence and economy keys the user did not set
    budget: int  # optimizer steps of a full run
    steps_per_epoch: int
    eval_every: int
    tune: list[tuple[str, list[str]]]  # extra tuned keys (--tune) and their values as written
    seeds: list[int]  # the final runs' seeds (paired: seed k is the same for every option)
    tuning_seed: int
    screen: bool
    metric: str
    mode: str
    test_metric: str  # reported at the end only, when the task scores a test set
    command: list[str] = field(default_factory=list)
    user_lr: str | None = None  # optimizer.lr=... on the command line: every option's "default" (grid centre)

    @property
    def rungs(self) -> tuple[int, ...]:
        return tuple(max(1, round(self.budget * f)) for f in RUNG_FRACTIONS)

    @property
    def rung_sizes(self) -> tuple[int, ...]:
        """Trials per rung for one option: the grid (x the --tune values) plus the extra points, then 1/ETA each."""
        n0 = len(GRID) * math.prod(len(v) for _, v in self.tune) + EXTRA_POINTS
        sizes = [n0]
        for _ in RUNG_FRACTIONS[1:]:
            sizes.append(max(1, sizes[-1] // ETA))
        return tuple(sizes)

    def length(self) -> str:
        """A full run: the same steps for every option, and each option's epochs where they differ."""
        epochs = {o.label: self.budget / o.steps_per_epoch for o in self.options}
        if len(set(epochs.values())) > 1:  # the same steps are not the same data: say it
            return (f"{self.budget} steps for every option ("
                    + ", ".join(f"{k}: {v:.3g} epochs" for k, v in epochs.items()) + ")")
        return f"{self.budget} steps ({self.budget / self.steps_per_epoch:.3g} epochs of {self.steps_per_epoch})"

    def tuning_steps(self) -> int:
        """Steps every option spends on tuning, pruned and diverged trials included."""
        return 0 if self.screen else sum(n * r for n, r in zip(self.rung_sizes, self.rungs, strict=True))

    def overrides(self, option: Option, steps: int, seed: int, lr_k: float | None = None,
                  extra: tuple[tuple[str, str], ...] = ()) -> list[str]:
        """The train.py command line of one trial."""
        args = [option.override if a == _AXIS else a for a in self.shared]
        args += self.protocol + option.scaled + [f"trainer.max_steps={steps}", f"trainer.seed={seed}"]
        if lr_k is not None:
            args.append(f"{LR_KEY}={format_lr(option.default_lr * lr_multiplier(lr_k))}")
        elif self.user_lr is not None:
            args.append(f"{LR_KEY}={self.user_lr}")
        args += [f"{k}={v}" for k, v in extra]
        return args

    def config(self, option: Option, overrides: list[str]) -> DictConfig:
        """The config of a trial: the option's composed config with the protocol's keys set (see the docstring)."""
        cfg = copy.deepcopy(option.cfg)
        head = len(self.shared)
        for text in overrides[head:]:
            key, value = parse_override(text)
            OmegaConf.update(cfg, key, value, merge=False)
        return cfg

    def shared_hash(self) -> str:
        """A hash of the config every run shares: the baseline's as composed (interpolations unresolved, so what
        depends on the axis, or on the machine's data root, does not count), without the compared axis and the keys
        the protocol sets per trial (seed, budget of the rung, tuned keys)."""
        data = OmegaConf.to_container(self.baseline.cfg, resolve=False)
        drop = [self.axis, *PROTOCOL_KEYS, *(k for k, _ in self.tune)]
        for key in drop:
            *parents, leaf = key.split(".")
            node = data
            for p in parents:
                node = node.get(p, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(leaf, None)
        text = OmegaConf.to_yaml(OmegaConf.create(data), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_AXIS = "\0axis"  # where the compared option goes in the shared overrides (the user's position)


def format_lr(lr: float) -> str:
    return f"{lr:.3g}"


def parse_override(text: str) -> tuple[str, Any]:
    """key=value -> (key, the value Hydra would set), through Hydra's own override parser."""
    o = OverridesParser.create().parse_overrides([text])[0]
    return o.key_or_group, o.value()


def compose(overrides: list[str]) -> DictConfig:
    """The config `python train.py <overrides>` runs (without the hydra node)."""
    from core.config import compose as compose_config

    return compose_config(overrides)


def split_axis(args: list[str]) -> tuple[str, list[str], list[str], list[str]]:
    """(axis key, option values, overrides with the axis marked by _AXIS, problems)."""
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as e:
        return "", [], [], [f"the command line does not parse: {e}"]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if not sweeps:
        return "", [], [], ["no compared axis: list the options with commas, e.g. optimizer=adamw,lion or "
                            "regularize.dropout=0,0.1"]
    if len(sweeps) > 1:
        names = ", ".join(o.input_line for o in sweeps)
        return "", [], [], [f"one compared axis at a time, got {len(sweeps)}: {names} (--tune key=v1,v2 tunes a "
                            "key per option instead)"]
    axis = sweeps[0]
    values = list(axis.sweep_string_iterator())
    shared = [_AXIS if o is axis else o.input_line for o in parsed]
    return axis.key_or_group, values, shared, []


def axis_problem(axis: str, screen: bool) -> str | None:
    """Why `axis` cannot be compared: the protocol sets it in every trial (PER_TRIAL). Screening sets no learning
    rate, so it compares learning rates."""
    if axis not in PER_TRIAL or (axis == LR_KEY and screen):
        return None
    return (f"{axis}: compare sets it in every trial ({PER_TRIAL[axis]}), so its values would not be compared; "
            "compare something else" + (", or use --screen to run these values as they are" if axis == LR_KEY
                                        else ""))


def build_plan(args: list[str], *, seeds: int, screen: bool, baseline: str | None, tune: list[str],
               evals: int, command: list[str]) -> Plan:
    """Parse, compose and validate everything; raise ConfigError listing every problem at once."""

    axis, values, shared, bad = split_axis(args)
    if bad:
        raise ConfigError("\n".join(bad))
    found: list[str] = []

    def add(line: str) -> None:
        if line not in found:
            found.append(line)

    if len(values) < 2:
        add(f"{axis}={','.join(values)}: compare needs at least two options")
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        add(f"{axis}: {', '.join(dupes)} listed twice")
    if seeds < 1 or (seeds < 2 and not screen):
        add(f"--seeds {seeds}: the paired test needs at least 2 seeds per option (--screen runs 1)")
    if baseline is not None and baseline not in values:
        add(f"--baseline {baseline}: not one of the options ({', '.join(values)})")
    if p := axis_problem(axis, screen):
        add(p)
    tuned = []
    for item in tune:
        key, _, vals = item.partition("=")
        vals_list = [v for v in vals.split(",") if v]
        if not key or not vals_list:
            add(f"--tune {item}: write key=v1,v2,...")
        elif key == axis:
            add(f"--tune {item}: {key} is the compared axis")
        elif key in PER_TRIAL:
            add(f"--tune {item}: compare sets it in every trial ({PER_TRIAL[key]})")
        else:
            tuned.append((key, vals_list))
    if screen and tuned:
        add("--tune with --screen: screening runs defaults only")

    # The protocol's keys come out of the shared overrides: a user's value becomes the budget / seed / LR default.
    user: dict[str, str] = {}
    kept = []
    for a in shared:
        key = a.split("=", 1)[0] if a != _AXIS else ""
        if key in PROTOCOL_KEYS:
            user[key] = a.split("=", 1)[1]
        else:
            kept.append(a)
    shared = kept

    group_opts = group_options(axis.split("@")[0]) if axis.split("@")[0] in groups() else None
    options: list[Option] = []
    known: dict[str, list[str]] = {}  # each option's problems
    for value in values:
        if group_opts is not None and value not in group_opts and value != "null":
            add(f"{axis}={value}: no such option in conf/{axis}/; {did_you_mean(value, group_opts)}")
            continue
        override = f"{axis}={value}"
        line = [override if a == _AXIS else a for a in shared]
        unknown = unknown_keys(line)
        for p in unknown:
            add(p)
        if unknown:
            continue  # composing would only fail on the same key
        try:
            cfg = compose(line + [f"{k}={v}" for k, v in user.items()])
        except HydraException as e:
            add(f"{override}: {reason(e)}")
            continue
        known[value] = problems(cfg)
        for p in known[value]:
            add(p if len(values) == 1 else f"[{value}] {p}")
        if unresolvable(cfg):
            continue  # reported above; what follows reads values
        lr = OmegaConf.select(cfg, LR_KEY, default=None)
        if not screen and not isinstance(lr, (int, float)):
            add(f"[{value}] {LR_KEY}: compare tunes it, but this option has none (--screen runs defaults only)")
            lr = None
        options.append(Option(value, override, cfg, float(lr) if isinstance(lr, (int, float)) else None))
    for key, vals_list in tuned:
        item = f"{key}={','.join(vals_list)}"
        for opt in options:
            if OmegaConf.select(opt.cfg, key, default="\0missing") == "\0missing":
                add(f"--tune {key}=...: [{opt.label}] has no key {key}")
                continue
            for value in vals_list:  # each value as a trial will set it, through the validator
                cfg = copy.deepcopy(opt.cfg)
                try:
                    OmegaConf.update(cfg, key, parse_override(f"{key}={value}")[1], merge=False)
                except Exception as e:
                    add(f"--tune {item}: [{opt.label}] {key}={value}: {reason(e)}")
                    continue
                for p in problems(cfg):
                    if p not in known[opt.label]:  # the option's own are reported already
                        add(f"--tune {item}: [{opt.label}] {p}")
    monitors = {(str(o.cfg.monitor.metric), str(o.cfg.monitor.mode)) for o in options}
    if len(monitors) > 1:
        add(f"the options monitor different metrics ({sorted(monitors)}): compare one task at a time")
    for metric, _ in monitors:
        if not metric.startswith("val_"):
            task = OmegaConf.select(options[0].cfg, "task._target_")
            add(f"monitor.metric={metric}: compare selects and times on a validation metric (val_...), never on the "
                f"test set, and {task} monitors {metric}. Give the task a validation split and monitor it "
                "(monitor.metric=val_...)")
    if found:
        raise ConfigError(f"compare: {len(found)} problem{'s' * (len(found) > 1)}:\n"
                          + "\n".join(f"  {x}" for x in found))

    base = next(o for o in options if o.label == (baseline or values[0]))
    metric, mode = monitors.pop()
    runs = _budgets(options)
    budget, steps_per_epoch = runs[base.label]
    if len({b for b, _ in runs.values()}) > 1:
        # Every trial runs the baseline's steps: an option asking for another length (epochs of another size, a
        # recipe with another budget) would silently run the baseline's. Refused rather than equalised, because
        # equal epochs (equal data) and equal steps (equal updates) are different questions: the user says which.
        lengths = ", ".join(f"{label}: {b} steps ({b / spe:.3g} epochs)" for label, (b, spe) in runs.items())
        raise ConfigError(f"the options' full runs differ: {lengths}; compare gives every option the same steps: "
                          f"set them with trainer.max_steps=N (the baseline's run is {budget})")
    if budget < 9 and not screen:
        raise ConfigError(f"a full run is {budget} steps: successive halving needs at least 9 (rungs of 1/9 and "
                          "1/3 of the budget); raise trainer.max_steps or trainer.max_epochs")
    eval_every, protocol = _cadence(shared, base.cfg, budget, steps_per_epoch, evals)
    for o in options:
        o.steps_per_epoch = runs[o.label][1]
        o.scaled = scaled_schedule(o.cfg, budget, o.steps_per_epoch)
    seed0 = int(user.get("trainer.seed", base.cfg.trainer.seed))
    return Plan(axis=axis, options=options, baseline=base, shared=shared, protocol=protocol, budget=budget,
                steps_per_epoch=steps_per_epoch, eval_every=eval_every, tune=tuned,
                seeds=[seed0 + 1 + k for k in range(seeds)], tuning_seed=seed0, screen=screen, metric=metric,
                mode=mode, test_metric=metric.replace("val_", "test_", 1), command=command, user_lr=user.get(LR_KEY))


def _budgets(options: list[Option]) -> dict[str, tuple[int, int]]:
    """Every option's (full run's steps, steps per epoch); options with the same task and budget keys share one."""
    seen: dict[str, tuple[int, int]] = {}
    out = {}
    for o in options:
        try:
            key = json.dumps([OmegaConf.to_container(o.cfg.task, resolve=True), o.cfg.trainer.max_steps,
                              o.cfg.trainer.max_epochs], sort_keys=True, default=str)
        except Exception:  # does not resolve: the option's own
            key = o.label
        if key not in seen:
            seen[key] = _budget(o.cfg)
        out[o.label] = seen[key]
    return out


def _budget(cfg: DictConfig) -> tuple[int, int]:
    """(steps of a full run, steps per epoch) as the trainer computes them (the task's data decides the epoch)."""
    task = instantiate(cfg.task)
    task.setup(torch.device("cpu"))
    sampler = SAMPLERS[getattr(task, "sampling", "epoch")](task.train_size, task.batch_size, 0, torch.device("cpu"))
    t = cfg.trainer
    total = t.max_steps if t.max_steps is not None else t.max_epochs * sampler.steps_per_epoch
    return int(total), sampler.steps_per_epoch


def _cadence(shared: list[str], cfg: DictConfig, budget: int, steps_per_epoch: int,
             evals: int) -> tuple[int, list[str]]:
    """Evaluation every `budget / evals` steps (or the user's trainer.eval_interval, turned into steps of the full
    run), the same steps for every option and every rung; plus the economy keys the user did not set."""
    given = {a.split("=", 1)[0] for a in shared if "=" in a}
    if "trainer.eval_interval" in given:
        every = Horizon(budget, steps_per_epoch).steps(cfg.trainer.eval_interval) or budget
    else:
        every = max(1, budget // max(1, evals))
    protocol = [f"trainer.eval_interval={every}"]
    protocol += [f"{k}={v}" for k, v in ECONOMY.items() if k not in given]
    return every, protocol


SCHEDULE_DURATIONS = ("warmup", "cooldown", "cycle_warmup", "cycle", "every", "step_size", "milestones")
AVERAGE_DURATIONS = ("start", "every", "half_life")  # weight averaging's (bn_steps counts batches: it stays)


def scaled_schedule(cfg: DictConfig, budget: int, steps_per_epoch: int) -> list[str]:
    """The schedule's (and weight averaging's) durations written in steps or epochs (`warmup: 100`, `every: 1ep`),
    as fractions of the full run, so that a rung trial of 1/9 of the budget is a scaled copy of the full run (warmup
    100 of 900 steps: 11 of 100) instead of a run that never leaves its warmup. The full run itself does not change.
    Fractions and percentages already scale; plateau's cooldown counts evaluations and stays."""
    return _scaled(cfg, "schedule", SCHEDULE_DURATIONS, budget, steps_per_epoch) + \
        _scaled(cfg, "average", AVERAGE_DURATIONS, budget, steps_per_epoch)


def _scaled(cfg: DictConfig, group: str, keys: tuple[str, ...], budget: int, steps_per_epoch: int) -> list[str]:
    node = cfg.get(group)
    if not isinstance(node, DictConfig):
        return []
    plateau = "plateau" in str(node.get("_target_", ""))
    horizon = Horizon(budget, steps_per_epoch)

    def fraction(v: Any) -> Any:
        absolute = (isinstance(v, int) and not isinstance(v, bool) and v > 0) or (
            isinstance(v, str) and v.strip().endswith("ep"))
        return repr(horizon.steps(v) / budget) if absolute else None

    out = []
    for key in keys:
        if plateau and key == "cooldown":  # evaluations, not steps
            continue
        v = OmegaConf.select(node, key, default=None)
        if isinstance(v, (list, tuple)) or OmegaConf.is_list(v):
            parts = [fraction(x) for x in v]
            if any(p is not None for p in parts):
                out.append(f"{group}.{key}=[{','.join(p if p is not None else str(x) for p, x in zip(parts, v))}]")
        elif (f := fraction(v)) is not None:
            out.append(f"{group}.{key}={f}")
    return out
