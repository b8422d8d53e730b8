"""Config checking, above the trainer: `check(cfg)` raises ConfigError listing every problem at once (exit code
2) before data or device are touched; the command line is checked before Hydra starts (config/cli.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from config.bind import TOP_LEVEL, check_groups, did_you_mean, fmt, targets
from config.bind import bind as _bind
from config.cli import required_groups
from config.resolve import unresolvable
from config.rules import check_construction, check_rules, horizon_numbers, oddities
from core.errors import ConfigError
from core.log import print_warning

_WARNED: set[str] = set()  # oddities already printed by this process (a sweep checks every job)


def problems(cfg: DictConfig) -> list[str]:
    """Every problem in `cfg`, one line each ('full.key=value: what is allowed'); empty when valid."""
    p = dict(unresolvable(cfg))
    try:
        check_groups(cfg, p, {g: o for g, o in required_groups().items() if g != "recipe"})
        for group in ("task", "optimizer", "schedule", "norm", "clip", "amp", "early_stop", "average", "regularize"):
            for key, node in targets(cfg.get(group), group) if group in cfg and group not in p else []:
                _bind(node, key, p)
        check_rules(cfg, p)
        check_construction(cfg, p)
    except Exception as e:  # a bug in a check must still end as a clear message, never a traceback
        p.setdefault("<checker>", f"the config could not be checked completely ({type(e).__name__}: {e}); "
                                  "please report this")
    resolving = [line for key, line in p.items() if ": cannot be resolved: " in line]
    order = {g: i for i, g in enumerate(TOP_LEVEL)}  # then by group, as the config reads
    return resolving + [line for _, line in sorted((x for x in p.items() if x[1] not in resolving),
                                                   key=lambda x: order.get(x[0].split(".")[0], len(order)))]


def check(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`; when it is valid, print its oddities (once each)."""
    lines = problems(cfg)
    if lines:
        n = len(lines)
        raise ConfigError(f"the config has {n} problem{'s' * (n > 1)}:\n" + "\n".join(f"  {x}" for x in lines)
                          + "\nFix them on the command line (key=value) or in the YAML; "
                          "HYDRA_FULL_ERROR=1 shows a traceback.")
    for line in oddities(cfg):
        if line not in _WARNED:
            _WARNED.add(line)
            print_warning(line)


validate = check
__all__ = ["check", "did_you_mean", "fmt", "horizon_numbers", "oddities", "problems", "unresolvable", "validate"]
