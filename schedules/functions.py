"""LR schedules as pure functions: step -> multiplier of each param group's base LR.

Each factory takes the run's Horizon (and its own options) and returns `f(step)`, the multiplier for the
update with index `step` (0-based). Notation in the docstrings: t = step, T = horizon.total_steps,
W = warmup steps, p = min(1, (t - W) / max(1, T - W)) the progress after warmup.
Properties every schedule keeps:
  * warmup never makes the first update zero: with the shared linear warmup, update t < W gets (t+1)/W of
    the peak, so update 0 gets 1/W and update W-1 the full peak;
  * after the horizon (t >= T) the multiplier stays at its floor: the value it has at t = T.
Durations (warmup, step_size, cycle, ...) are steps (int), epochs ("2ep") or a fraction of the run
(float <= 1), converted by Horizon.steps. Bad options raise ValueError naming the key and the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from schedules.horizon import Horizon

Schedule = Callable[[int], float]
Duration = int | float | str | None


# -- shared helpers --------------------------------------------------------------------------------
def duration_steps(horizon: Horizon, key: str, value: Duration) -> int:
    """Horizon.steps(value), with errors that name the config key `schedule.<key>`."""
    try:
        return horizon.steps(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"schedule.{key}={value!r}: {e}") from None


def warmup_steps(horizon: Horizon, warmup: Duration, key: str = "warmup") -> int:
    """The warmup length in steps; it must fit in the run."""
    W = duration_steps(horizon, key, warmup)
    T = horizon.total_steps
    if W > T:
        raise ValueError(f"schedule.{key}={warmup!r} is {W} steps, longer than the run ({T} steps)")
    return W


def linear_warmup(step: int, warmup: int) -> float:
    """(t+1)/W: update 0 gets 1/W of the peak, update W-1 the whole peak (never zero)."""
    return (step + 1) / warmup


def with_warmup(W: int, after: Schedule) -> Schedule:
    """The shared warmup prefix: (t+1)/W for t < W, then `after(t)` (which sees the absolute step)."""
    if W == 0:
        return after

    def f(step: int) -> float:
        return linear_warmup(step, W) if step < W else after(step)

    return f


def check_range(key: str, value: float, low: float, high: float, low_open: bool = False,
                high_open: bool = False, what: str = "") -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok_low = number and (value > low if low_open else value >= low)
    ok_high = number and (value < high if high_open else value <= high)
    if not (ok_low and ok_high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        note = f" ({what})" if what else ""
        raise ValueError(f"schedule.{key}={value!r} must be in {lo}{low}, {high}{hi}{note}")


def _check_floor(floor: float) -> None:
    check_range("floor", floor, 0.0, 1.0, what="the final LR as a fraction of the peak LR")


def _check_k(k: float) -> None:
    check_range("k", k, 0.0, math.inf, low_open=True, high_open=True,
                what="k-decay exponent; 1 is the plain schedule")


def anneal(horizon: Horizon, W: int, shape: Callable[[float], float], floor: float) -> Schedule:
    """floor + (1-floor) * shape(p) after warmup, p = min(1, (t-W)/max(1, T-W)); shape(0)=1, shape(1)=0."""
    decay = max(1, horizon.total_steps - W)

    def after(step: int) -> float:
        progress = min(1.0, (step - W) / decay)
        return floor + (1.0 - floor) * shape(progress)

    return with_warmup(W, after)


def decays(schedule: Schedule, total_steps: int, samples: int = 1000) -> bool:
    """Whether the multiplier ever falls over a run of `total_steps` (sampled at up to `samples` steps); a
    metric-driven schedule (one that observes evaluations, such as plateau) may fall at any evaluation."""
    if callable(getattr(schedule, "observe", None)):
        return True
    steps = sorted({round(i * (total_steps - 1) / max(1, samples - 1)) for i in range(samples)})
    peak = -math.inf
    for t in steps:
        value = schedule(t)
        if value < peak:
            return True
        peak = max(peak, value)
    return False


# -- warmup then constant --------------------------------------------------------------------------------
def constant(horizon: Horizon) -> Schedule:
    """The LR stays at its base value: f(t) = 1."""
    return lambda step: 1.0


def warmup_linear(horizon: Horizon, warmup: Duration = 0.05) -> Schedule:
    """Linear warmup to the peak, then constant.

    f(t) = (t+1)/W for t < W; 1 after. (Goyal et al., 'Accurate, Large Minibatch SGD', 1706.02677, gradual
    warmup.) For warmup followed by a linear decay (HF get_linear_schedule_with_warmup) use `poly` (power 1).
    """
    return with_warmup(warmup_steps(horizon, warmup), lambda step: 1.0)


def warmup_exp(horizon: Horizon, warmup: Duration = 0.05, start: float = 0.01) -> Schedule:
    """Exponential (geometric) warmup from `start` x peak to the peak, then constant.

    f(t) = start ** (1 - (t+1)/W) for t < W; 1 after. The LR grows by the same factor start**(-1/W) every
    update, so update 0 gets start**(1-1/W) > 0 and update W-1 the peak. (Exponential warmup of the source
    document 004; compare the geometric ramp of the LR range test, Smith 1506.01186.)
    """
    check_range("start", start, 0.0, 1.0, low_open=True, what="the first LR as a fraction of the peak")
    W = warmup_steps(horizon, warmup)

    def f(step: int) -> float:
        return start ** (1.0 - (step + 1) / W) if step < W else 1.0

    return f


# -- step decays --------------------------------------------------------------------------------
def step(horizon: Horizon, step_size: Duration = 0.25, gamma: float = 0.5, warmup: Duration = 0) -> Schedule:
    """Step decay: multiply by `gamma` every `step_size`, counted from step 0 (like torch StepLR, per update).

    f(t) = gamma ** floor(min(t, T) / S) for t >= W; the shared linear warmup (t+1)/W before.
    (Step decay of the source document 003, e.g. x0.5 every 10 epochs: step_size="10ep", gamma=0.5.)
    """
    check_range("gamma", gamma, 0.0, 1.0, low_open=True, what="the factor applied at each decay")
    S = duration_steps(horizon, "step_size", step_size)
    W = warmup_steps(horizon, warmup)
    if S < 1:
        raise ValueError(f"schedule.step_size={step_size!r} is {S} steps; it must be at least 1 step")
    if S < W:
        raise ValueError(f"schedule.step_size={step_size!r} ({S} steps) is shorter than "
                         f"schedule.warmup={warmup!r} ({W} steps): the first decay would fall in the warmup")
    T = horizon.total_steps
    return with_warmup(W, lambda t: gamma ** (min(t, T) // S))


def multistep(horizon: Horizon, milestones: Sequence[Duration] = (0.5, 0.75), gamma: float = 0.1,
              warmup: Duration = 0) -> Schedule:
    """Multiply by `gamma` at each milestone (positions in the run from step 0, like torch MultiStepLR).

    f(t) = gamma ** #{m in milestones : m <= min(t, T)} for t >= W; the shared linear warmup before.
    (He et al., ResNet 1512.03385: x0.1 at fixed points of the run.)
    """
    check_range("gamma", gamma, 0.0, 1.0, low_open=True, what="the factor applied at each milestone")
    if isinstance(milestones, str | int | float):
        raise ValueError(f"schedule.milestones={milestones!r} must be a list of durations, "
                         "e.g. [0.5, 0.75] or ['30ep', '60ep']")
    W = warmup_steps(horizon, warmup)
    marks = sorted(duration_steps(horizon, "milestones", m) for m in milestones)
    if marks and marks[0] < W:
        raise ValueError(f"schedule.milestones={list(milestones)!r}: the first milestone ({marks[0]} steps) "
                         f"falls inside schedule.warmup={warmup!r} ({W} steps)")
    T = horizon.total_steps
    return with_warmup(W, lambda t: gamma ** sum(m <= min(t, T) for m in marks))


def exponential(horizon: Horizon, gamma: float = 0.9, every: Duration = "1ep", floor: float = 0.0,
                warmup: Duration = 0) -> Schedule:
    """Exponential decay, smooth per update: the LR shrinks by `gamma` over each `every` (E steps).

    f(t) = floor + (1-floor) * gamma ** ((min(t, T) - W) / E) for t >= W; the shared linear warmup before.
    This is lr0 * exp(-k t) (source document 003) with k = -ln(gamma)/E, and torch ExponentialLR with E = 1.
    """
    check_range("gamma", gamma, 0.0, 1.0, low_open=True, what="the factor applied over each `every`")
    _check_floor(floor)
    E = duration_steps(horizon, "every", every)
    if E < 1:
        raise ValueError(f"schedule.every={every!r} is {E} steps; it must be at least 1 step")
    W = warmup_steps(horizon, warmup)
    T = horizon.total_steps
    return with_warmup(W, lambda t: floor + (1.0 - floor) * gamma ** ((min(t, T) - W) / E))


# -- annealing over the run --------------------------------------------------------------------------------
def _half_cosine(k: float) -> Callable[[float], float]:
    return lambda p: 0.5 * (1.0 + math.cos(math.pi * p**k))


def cosine(horizon: Horizon, warmup: Duration = 0, floor: float = 0.0, k: float = 1.0) -> Schedule:
    """Cosine annealing from the peak to `floor` x peak at the end of the run; optional warmup and k-decay.

    f(t) = floor + (1-floor) * (1 + cos(pi * p**k)) / 2 after the shared linear warmup (Loshchilov & Hutter,
    SGDR 1608.03983, one cycle). k-decay (Zhang & Li 2004.05909) replaces t/T by t^k/T^k: k > 1 keeps the LR
    high for longer, k = 1 is the plain cosine.
    """
    _check_floor(floor)
    _check_k(k)
    return anneal(horizon, warmup_steps(horizon, warmup), _half_cosine(k), floor)


def cosine_warmup(horizon: Horizon, warmup: Duration = 0.05, floor: float = 0.0) -> Schedule:
    """Linear warmup to the peak, then half a cosine down to `floor` x peak at the end of the run.

    f(t) = (t+1)/W for t < W;  floor + (1-floor) * (1 + cos(pi * min(1, (t-W)/(T-W)))) / 2 after.
    (Loshchilov & Hutter, SGDR 1608.03983, without restarts; HF get_cosine_schedule_with_warmup; the warmup
    keeps step 0 non-zero.) The same as `cosine` with a 5% warmup by default.
    """
    return cosine(horizon, warmup=warmup, floor=floor)


def poly(horizon: Horizon, power: float = 1.0, warmup: Duration = 0, floor: float = 0.0,
         k: float = 1.0) -> Schedule:
    """Polynomial decay to `floor` x peak at the end of the run, with optional warmup and k-decay.

    f(t) = floor + (1-floor) * (1 - p**k) ** power after the shared linear warmup. power = 1 with warmup is
    HF's get_linear_schedule_with_warmup; power = 0.9 is DeepLab's 'poly' (Chen et al. 1606.00915); k-decay
    (Zhang & Li 2004.05909) replaces t/T by t^k/T^k.
    """
    check_range("power", power, 0.0, math.inf, low_open=True, high_open=True, what="the exponent of (1 - p)")
    _check_floor(floor)
    _check_k(k)
    return anneal(horizon, warmup_steps(horizon, warmup), lambda p: (1.0 - p**k) ** power, floor)


WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    "1-sqrt": lambda q: 1.0 - math.sqrt(q),
}


def wsd(horizon: Horizon, warmup: Duration = 0.05, cooldown: Duration = 0.2, shape: str = "1-sqrt",
        floor: float = 0.0) -> Schedule:
    """Warmup-stable-decay: linear warmup, the peak held, then a final cooldown of C steps to `floor` x peak.

    f(t) = (t+1)/W for t < W; 1 for W <= t < T-C; floor + (1-floor) * shape(q) with q = min(1, (t-(T-C))/C)
    after, where shape is linear 1-q, cosine (1+cos(pi q))/2 or 1-sqrt 1-sqrt(q).
    (Hu et al., MiniCPM 2404.06395; Hägele et al. 2405.18392, who find the 1-sqrt cooldown best.)
    """
    if shape not in WSD_SHAPES:
        raise ValueError(f"schedule.shape={shape!r}: use one of {sorted(WSD_SHAPES)}")
    _check_floor(floor)
    W = warmup_steps(horizon, warmup)
    C = duration_steps(horizon, "cooldown", cooldown)
    T = horizon.total_steps
    if W + C > T:
        raise ValueError(f"schedule.warmup={warmup!r} ({W} steps) + schedule.cooldown={cooldown!r} "
                         f"({C} steps) are longer than the run ({T} steps)")
    fn, start = WSD_SHAPES[shape], T - C

    def after(t: int) -> float:
        if t < start:
            return 1.0
        return floor + (1.0 - floor) * fn(min(1.0, (t - start) / max(1, C)))

    return with_warmup(W, after)


def inverse_sqrt(horizon: Horizon, warmup: Duration = 0.05) -> Schedule:
    """Linear warmup, then decay with the inverse square root of the step count; continuous at the peak.

    With s = min(t, T) + 1 updates done and W' = max(W, 1):  f(t) = min(s/W', sqrt(W'/s)),
    i.e. s/W' up to the peak 1 at s = W', then sqrt(W'/s). (Vaswani et al., 'Attention is all you need'
    1706.03762: lr = d^-0.5 min(s^-0.5, s W^-1.5), normalised here to peak 1.)
    """
    W = max(1, warmup_steps(horizon, warmup))
    T = horizon.total_steps

    def f(t: int) -> float:
        s = min(t, T) + 1
        return min(s / W, math.sqrt(W / s))

    return f


def sgdr(horizon: Horizon, cycle: Duration = 0.25, t_mult: float = 1.0, decay: float = 1.0,
         cycle_warmup: Duration = 0, cycles: int | None = None, floor: float = 0.0,
         warmup: Duration = 0) -> Schedule:
    """SGD with warm restarts: cosine cycles, each `t_mult` times longer and `decay` times lower than the last
    one.

    Cycle i (0-based) lasts L_i = round(L_0 * t_mult**i) steps and peaks at P_i = max(floor, decay**i).
    With tau the step inside the cycle and Wc = cycle_warmup: f = P_i * (tau+1)/Wc for tau < Wc, else
    floor + (P_i - floor) * (1 + cos(pi * (tau-Wc)/(L_i-Wc))) / 2. The cycles start after the shared linear
    warmup W. After `cycles` cycles (None: no limit) and after the horizon, f = floor.
    (Loshchilov & Hutter, SGDR 1608.03983: T_0, T_mult; peak decay per cycle as timm's cycle_decay.)
    """
    _check_floor(floor)
    check_range("t_mult", t_mult, 1.0, math.inf, high_open=True, what="a cycle's length over the last one's")
    check_range("decay", decay, 0.0, 1.0, low_open=True, what="each cycle's peak over the last one's")
    if cycles is not None and (isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1):
        raise ValueError(f"schedule.cycles={cycles!r} must be a positive number of cycles or null (no limit)")
    W = warmup_steps(horizon, warmup)
    L0 = duration_steps(horizon, "cycle", cycle)
    Wc = duration_steps(horizon, "cycle_warmup", cycle_warmup)
    if L0 < 1:
        raise ValueError(f"schedule.cycle={cycle!r} is {L0} steps; a cycle must be at least 1 step")
    if Wc >= L0:
        raise ValueError(f"schedule.cycle_warmup={cycle_warmup!r} ({Wc} steps) must be shorter than "
                         f"schedule.cycle={cycle!r} ({L0} steps)")
    T = horizon.total_steps

    def after(t: int) -> float:
        if t >= T:
            return floor
        tau, i, length = t - W, 0, L0
        while tau >= length:  # O(log t) cycles when t_mult > 1; jump straight there when t_mult == 1
            if t_mult == 1.0:
                i, tau = tau // length, tau % length
                break
            tau, i = tau - length, i + 1
            length = max(1, round(L0 * t_mult**i))
        if cycles is not None and i >= cycles:
            return floor
        peak = max(floor, decay**i)
        if tau < Wc:
            return peak * (tau + 1) / Wc
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * (tau - Wc) / (length - Wc)))

    return with_warmup(W, after)
