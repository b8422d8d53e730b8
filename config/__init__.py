"""Config checking: `check(cfg)` raises ConfigError listing every problem at once, before data or device are used."""

from __future__ import annotations

from omegaconf import DictConfig

from config.bind import BOUND, TOP_LEVEL, check_groups, targets
from config.bind import bind as _bind  # not `bind`: that name is the module config.bind
from config.cli import required_groups
from config.resolve import unresolvable
from config.rules import check_construction, check_rules, oddities
from core.errors import ConfigError
from core.log import print_warning
from core.messages import did_you_mean

_WARNED: set[str] = set()  # oddities already printed by this process (a sweep checks every job)


def problems(cfg: DictConfig) -> list[str]:
    """Every problem in `cfg`, one line each ('full.key=value: what is allowed'); empty when valid."""
    p = unresolvable(cfg)
    try:
        check_groups(cfg, p, required_groups())
        for group in (*BOUND, "regularize"):  # regularize.augment
            for key, node in targets(cfg.get(group), group) if group not in p else []:
                _bind(node, key, p)
        check_rules(cfg, p)
        check_construction(cfg, p)
    except Exception as e:  # a bug in a check must still end as a clear message, never a traceback
        p.setdefault("<checker>", f"the config could not be checked completely ({type(e).__name__}: {e}); "
                                  "please report this")
    order = {g: i for i, g in enumerate(TOP_LEVEL)}  # values that do not resolve first, then as the config reads
    return [line for _, line in sorted(p.items(), key=lambda x: (": cannot be resolved: " not in x[1],
                                                                    order.get(x[0].split(".")[0], len(order))))]


def check(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`; when it is valid, print its oddities (once each)."""
    if lines := problems(cfg):
        raise ConfigError(f"the config has {len(lines)} problem{'s' * (len(lines) > 1)}:\n  " + "\n  ".join(lines)
                          + "\nFix them on the command line (key=value) or in the YAML; HYDRA_FULL_ERROR=1 shows a "
                          "traceback.")
    for line in [x for x in oddities(cfg) if x not in _WARNED]:
        _WARNED.add(line)
        print_warning(line)


validate = check
__all__ = ["check", "did_you_mean", "oddities", "problems", "unresolvable", "validate"]
