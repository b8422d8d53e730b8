"""The config schema: what every key may hold, as one declarative table (used by trainer/validate.py).

A `Spec` is a predicate on a (resolved) value plus the words that say what is allowed. `RULES` maps key patterns
to specs; a pattern is matched against the full dotted key with fnmatch (`*` also spans dots, so
`optimizer*.lr` covers `optimizer.lr` and `optimizer.inner.lr`). The first matching rule decides.

Groups without a `_target_` (trainer, regularize, data, monitor) are closed: every key they hold must have an
exact rule `<group>.<key>` here, so an unknown key gets a did-you-mean from this table. Groups with a
`_target_` get their key names from the target's signature (validate.py binds them) and their ranges from here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# --- specs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    ok: Callable[[Any], bool]
    allowed: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.ok(value))
        except Exception:  # a predicate never raises on odd input: odd input is just not allowed
            return False


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and not (v > lo if lo_open else v >= lo):
        return False
    return hi is None or (v < hi if hi_open else v <= hi)


def num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
        integer: bool = False, nullable: bool = False) -> Spec:
    """A finite number (an int when `integer`) in the given interval; null too when `nullable`."""
    kind = "an int" if integer else "a number"
    allowed = f"{kind} {_interval(lo, hi, lo_open, hi_open)}".strip()
    if nullable:
        allowed = f"null or {allowed}"

    def ok(v: Any) -> bool:
        if v is None:
            return nullable
        return (is_int(v) if integer else is_number(v)) and _in_range(v, lo, hi, lo_open, hi_open)

    return Spec(ok, allowed)


def one_of(*values: Any, nullable: bool = False) -> Spec:
    words = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    return Spec(lambda v: (v is None and nullable) or (not isinstance(v, bool) and v in values),
                f"one of {words}" + (" or null" if nullable else ""))


def boolean(nullable: bool = False) -> Spec:
    return Spec(lambda v: isinstance(v, bool) or (nullable and v is None), "true or false" + (" or null" * nullable))


def text(nullable: bool = False) -> Spec:
    return Spec(lambda v: isinstance(v, str) or (nullable and v is None), "a string" + (" or null" * nullable))


def pair(elem: Spec) -> Spec:
    return Spec(lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(elem(x) for x in v),
                f"a list of two values, each {elem.allowed}")


def scalar_or_list(elem: Spec) -> Spec:
    """eps-like keys: one value, or a list of them where null entries are allowed (Adafactor's [null, 1e-3])."""
    return Spec(lambda v: elem(v) or (isinstance(v, list | tuple) and len(v) > 0
                                      and all(x is None or elem(x) for x in v)),
                f"{elem.allowed}, or a list of such values (null entries allowed)")


_DURATION_WORDS = "steps (an int >= 0), epochs ('2ep') or a fraction of the run (a float in [0, 1])"


def duration_ok(v: Any, positive: bool = False) -> bool:
    """The syntax schedules.horizon.Horizon.steps accepts: int >= 0, float in [0, 1], 'Nep', 'N%', or a
    number written as a string. `positive`: zero is not allowed."""
    if isinstance(v, bool) or v is None:
        return False
    if isinstance(v, str):
        s = v.strip()
        try:
            if s.endswith("ep"):
                x = float(s[:-2])
                return math.isfinite(x) and (x > 0 if positive else x >= 0)
            if s.endswith("%"):
                x = float(s[:-1])
                return 0 <= x <= 100 and (x > 0 or not positive)
            return duration_ok(float(s) if "." in s else int(s), positive)
        except ValueError:
            return False
    if is_int(v):
        return v > 0 if positive else v >= 0
    if is_number(v):
        return 0 <= v <= 1 and (v > 0 or not positive)
    return False


def duration(positive: bool = False, nullable: bool = False) -> Spec:
    words = ("a positive duration: " if positive else "a duration: ") + _DURATION_WORDS
    return Spec(lambda v: (v is None and nullable) or duration_ok(v, positive), words + (" or null" * nullable))


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
device_spec = Spec(lambda v: isinstance(v, str) and bool(DEVICE_RE.match(v)), "auto, cpu, cuda, cuda:N or mps")


def _short_ok(v: Any) -> bool:
    """expect.short: the quick version of a recipe (overrides) and what it must reach; its numbers follow the
    same rules as expect.target / tolerance / measured / wall_time_s."""
    return (isinstance(v, dict) and {"overrides", "target"} <= set(v) <= {"overrides", "target", "tolerance",
                                                                           "measured", "wall_time_s"}
            and isinstance(v["overrides"], list) and all(isinstance(o, str) and "=" in o for o in v["overrides"])
            and num()(v["target"]) and num(0)(v.get("tolerance", 0)) and num(nullable=True)(v.get("measured"))
            and num(0, lo_open=True, nullable=True)(v.get("wall_time_s")))


# trainer.seed: torch generators take seeds in [-2**63, 2**64) (ValueError beyond), and the samplers seed theirs
# with seed * 1000003 + step (core/sampler.py), so the seed must leave that product room below 2**64: 2**44 - 1
# leaves 8e17 steps. Python's random takes any int and numpy gets seed % 2**32 (trainer/rng.py). Negative seeds are
# refused: torch would wrap -1 to 2**64 - 1, another run's seed.
SEED_MAX = 2**44 - 1
seed_spec = Spec(lambda v: is_int(v) and 0 <= v <= SEED_MAX,
                 f"an int in [0, {SEED_MAX}] (2**44 - 1: the samplers seed torch generators with "
                 "seed * 1000003 + step, which must stay below 2**64)")

# --- the table -------------------------------------------------------------------------------------------

UNIT = num(0, 1, hi_open=True)  # [0, 1): betas, momentum, dropout, label smoothing
NONNEG = num(0)
POS = num(0, lo_open=True)
POS_INT = num(1, integer=True)
NONNEG_INT = num(0, integer=True)

RULES: list[tuple[str, Spec]] = [
    # trainer (closed group: every key is listed)
    ("trainer.device", device_spec),
    ("trainer.seed", seed_spec),
    ("trainer.max_epochs", num(1, integer=True, nullable=True)),
    ("trainer.max_steps", num(1, integer=True, nullable=True)),
    ("trainer.grad_accum", POS_INT),
    ("trainer.log_interval", duration(positive=True)),
    ("trainer.eval_interval", duration()),
    ("trainer.checkpoint_interval", duration()),
    ("trainer.keep_checkpoints", NONNEG_INT),
    ("trainer.histogram_interval", duration()),
    ("trainer.pictures", boolean()),
    ("trainer.resume", text(nullable=True)),
    ("trainer.threads", num(1, integer=True, nullable=True)),
    ("trainer.deterministic", boolean()),
    ("trainer.compile", boolean()),
    ("trainer.tf32", boolean()),
    ("trainer.progress", one_of("auto", "rich", "plain", "off")),
    ("trainer.dry_run", boolean()),
    ("trainer.nonfinite", one_of("raise", "skip")),
    ("trainer.max_nonfinite", POS_INT),
    ("trainer.fp16_max_retries", NONNEG_INT),
    ("trainer.fp16_min_scale", num(0, lo_open=True)),
    ("trainer.existing_run", one_of("refuse", "move_aside")),
    ("trainer.resume_allow_changes", boolean()),
    ("trainer.resume_allow_data_changes", boolean()),
    ("trainer.strategy", one_of("single", "ddp")),
    # regularize (closed; `augment` is a `_target_` node or null, checked by its signature)
    ("regularize.dropout", UNIT),
    ("regularize.weight_decay", NONNEG),
    ("regularize.weight_decay_mode", one_of("coupled", "decoupled")),
    ("regularize.decay_bias_and_norm", boolean()),
    ("regularize.decay_embeddings", boolean()),
    ("regularize.label_smoothing", UNIT),
    ("regularize.loss_reduction", one_of("mean", "soft_median")),  # = regularize.loss_reduction.REDUCTIONS
    ("regularize.augment", Spec(lambda v: v is None or isinstance(v, dict), "null or a node with a _target_")),
    ("regularize.augment.p", UNIT),
    ("regularize.augment.degrees", NONNEG),
    ("regularize.augment.translate", UNIT),
    ("regularize.augment.crop_padding", NONNEG_INT),
    ("regularize.augment.erase_p", num(0, 1)),
    ("regularize.augment.scale", pair(POS)),
    ("regularize.augment.erase_area", pair(num(0, 1))),
    # data, monitor (closed)
    ("data.root", text()),
    ("data.download", Spec(lambda v: v == "auto" or isinstance(v, bool), "auto, true or false")),
    ("data.workers", NONNEG_INT),
    ("data.pin_memory", Spec(lambda v: v == "auto" or isinstance(v, bool), "auto, true or false")),
    ("data.prefetch", POS_INT),
    ("data.persistent_workers", boolean()),
    ("monitor.metric", text()),
    ("monitor.mode", one_of("min", "max")),
    # expect (closed): a recipe's declared result, checked by `python -m experiments.check_recipes`
    ("expect.metric", text()),
    ("expect.mode", one_of("min", "max")),
    ("expect.target", num()),
    ("expect.tolerance", num(0)),
    ("expect.device", one_of("cpu", "cuda", "any")),
    ("expect.measured", num(nullable=True)),
    ("expect.wall_time_s", num(0, lo_open=True, nullable=True)),  # seconds, `python train.py recipe=...` end to end
    ("expect.measured_on", text(nullable=True)),  # the machine the figures were measured on
    ("expect.short", Spec(_short_ok, "a mapping {overrides: [key=value, ...], target: number, "
                                     "tolerance: number >= 0, measured: number or null, wall_time_s: seconds > 0}")),
    # optimizer (and nested ones: optimizer.inner for lookahead)
    ("optimizer*.lr", POS),
    ("optimizer*.betas", pair(UNIT)),
    ("optimizer*.adamw_betas", pair(UNIT)),
    ("optimizer*.beta", UNIT),
    ("optimizer*.eps", scalar_or_list(NONNEG)),
    ("optimizer*.adamw_eps", NONNEG),
    ("optimizer*.weight_decay", NONNEG),
    ("optimizer*.momentum", UNIT),
    ("optimizer*.dampening", num(0, 1)),
    ("optimizer*.alpha", num(0, 1)),  # RMSprop smoothing; Lookahead also needs > 0 (its own check)
    ("optimizer*.k", POS_INT),
    ("optimizer*.ns_steps", POS_INT),
    ("optimizer*.ns_dtype", one_of("auto", "bfloat16", "float32")),
    ("optimizer*.lr_decay", NONNEG),
    ("optimizer*.momentum_decay", NONNEG),
    ("optimizer*.initial_accumulator_value", NONNEG),
    ("optimizer*.kappa", POS),
    ("optimizer*.gamma", UNIT),
    ("optimizer*.reg_step", POS_INT),
    ("optimizer*.reg_ema", UNIT),
    ("optimizer*.growth", num(0, 1, lo_open=True)),
    ("optimizer*.foreach", boolean(nullable=True)),
    ("optimizer*.fused", boolean(nullable=True)),
    ("optimizer*.cautious", boolean()),
    ("optimizer*.cautious_wd", boolean()),
    ("optimizer*.always_adapt", boolean()),
    ("optimizer*.beta_max", UNIT),  # adaptive memory (am_sgd)
    ("optimizer*.lam", NONNEG),
    ("optimizer*.order", num(-1, 1, lo_open=True, hi_open=True)),  # gl_fractional
    ("optimizer*.window", POS_INT),
    ("optimizer*.tau", POS),  # adamw2
    ("optimizer*.power_iters", POS_INT),
    ("optimizer*.nesterov", boolean()),
    # schedule
    ("schedule.warmup", duration()),
    ("schedule.cooldown", duration()),  # wsd: a duration; plateau: evaluations (an int >= 0 is both)
    ("schedule.cycle_warmup", duration()),
    ("schedule.cycle", duration(positive=True)),
    ("schedule.every", duration(positive=True)),
    ("schedule.step_size", duration(positive=True)),
    ("schedule.milestones", Spec(lambda v: isinstance(v, list | tuple) and all(duration_ok(x) for x in v),
                                 "a list of durations: " + _DURATION_WORDS)),
    ("schedule.floor", num(0, 1)),
    ("schedule.gamma", num(0, 1, lo_open=True)),
    ("schedule.k", POS),
    ("schedule.power", POS),
    ("schedule.start", num(0, 1, lo_open=True)),
    ("schedule.t_mult", num(1)),
    ("schedule.decay", num(0, 1, lo_open=True)),
    ("schedule.cycles", num(1, integer=True, nullable=True)),
    ("schedule.shape", one_of("linear", "cosine", "1-sqrt")),
    ("schedule.mode", one_of("min", "max")),
    ("schedule.monitor", text()),
    ("schedule.factor", num(0, 1, lo_open=True, hi_open=True)),
    ("schedule.patience", NONNEG_INT),
    ("schedule.threshold", NONNEG),
    ("schedule.threshold_mode", one_of("rel", "abs")),
    ("schedule.min_multiplier", num(0, 1)),
    # norm, amp, early stopping
    ("norm.kind", one_of("none", "batchnorm", "layernorm", "rmsnorm")),  # = tasks.norm.KINDS
    ("norm.eps", POS),
    ("amp.dtype", one_of("float32", "bfloat16", "float16")),
    ("early_stop.monitor", text()),
    ("early_stop.mode", one_of("min", "max")),
    ("early_stop.patience", NONNEG_INT),
    ("early_stop.min_delta", NONNEG),
    ("early_stop.restore_best", boolean()),
    # gradient transforms
    ("clip.*.max_norm", POS),
    ("clip.*.norm_type", POS),
    ("clip.*.value", POS),
    ("clip.*.clipping", POS),
    ("clip.*.eps", POS),
    ("clip.*.window", POS_INT),
    ("clip.*.warmup", POS_INT),
    ("clip.*.percentile", num(0, 100)),
    ("clip.*.decay", num(0, 1, lo_open=True)),
    ("clip.*.skip_head", boolean()),
    # tasks
    ("task.batch_size", POS_INT),
    ("task.eval_batch_size", POS_INT),
    ("task.val_size", num(0, 59999, integer=True)),  # 0: no validation split (the VAE only)
    ("task.dropout", UNIT),
    ("task.label_smoothing", UNIT),
    ("task.hidden", POS_INT),
    ("task.latent", POS_INT),
    ("task.block_size", POS_INT),
    ("task.n_layer", POS_INT),
    ("task.n_head", POS_INT),
    ("task.n_embd", POS_INT),
    ("task.eval_batches", num(1, integer=True, nullable=True)),
    ("task.final_whole_split", boolean()),
    ("task.sample_chars", NONNEG_INT),
    ("task.num_pictures", NONNEG_INT),
    ("task.bias", boolean()),
    ("task.download", one_of("auto", True, False)),
    ("task.data_root", text()),
    ("task.text_path", text()),
    ("task.val_fraction", num(0, 1, lo_open=True, hi_open=True)),  # image_classification
    ("task.num_classes", num(2, integer=True, nullable=True)),
    ("task.image_size", num(1, integer=True, nullable=True)),
    ("task.bad_images", one_of("error", "skip")),
]

# Groups with no `_target_`: every key must be one of these (from RULES).
CLOSED_GROUPS = ("trainer", "regularize", "data", "monitor", "expect")
TOP_LEVEL = ("task", "optimizer", "schedule", "norm", "regularize", "clip", "amp", "early_stop", "trainer", "data",
             "monitor", "expect")
# Known training-set sizes, so total steps (and so "warmup longer than the run") can be checked without data.
MNIST_TRAIN = 60000


def closed_keys(group: str) -> list[str]:
    prefix = group + "."
    return [p[len(prefix):] for p, _ in RULES if p.startswith(prefix) and "*" not in p and "." not in p[len(prefix):]]


def matching_rule(key: str, rules: Sequence[tuple[str, Spec]] = RULES) -> Spec | None:
    from fnmatch import fnmatchcase

    for pattern, spec in rules:
        if fnmatchcase(key, pattern):
            return spec
    return None
