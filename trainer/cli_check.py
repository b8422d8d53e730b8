"""Unknown keys on the command line, reported like every other config error (all at once, did-you-mean, exit 2).

Hydra composes in struct mode and stops at the first override whose key is not in the config, with exit code 1
and no suggestion. Before handing over to Hydra, train.py composes the config once with only the overrides that
pick options (`group=option`, `+key=`, `~key`), then checks every plain `key=value` against the result.
Sweeps (`-m`) are left to Hydra: their values are lists and ranges.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def unknown_keys(args: list[str]) -> list[str]:
    """One message per plain override whose key is not in the composed config."""
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return []  # a syntax error: Hydra's own message says where
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    picks, plain = [], []
    for o in overrides:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_add() or o.is_delete() or o.is_force_add() or key.split("@")[0] in groups:
            picks.append(o.input_line)
        else:
            plain.append(o)
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            # hydra.searchpath stays: a task kept in the user's own package is composed too
            cfg = compose("train", overrides=[p for p in picks if not p.startswith("hydra")
                                              or p.startswith("hydra.searchpath=")])
    except HydraException:
        return []  # an unknown option and the like: Hydra reports it with the list of choices
    problems = []
    for o in plain:
        parent_key, _, leaf = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if isinstance(parent, DictConfig) and leaf in parent:
            continue
        if not isinstance(parent, DictConfig):
            problems.append(f"{o.key_or_group}: unknown key ({parent_key or 'the config'} has no such section)")
            continue
        close = difflib.get_close_matches(leaf, [str(k) for k in parent], n=1)
        hint = f"; did you mean '{parent_key + '.' if parent_key else ''}{close[0]}'?" if close else ""
        problems.append(f"{o.key_or_group}={o.value()}: unknown key{hint} "
                        f"(to add a new key on purpose: +{o.key_or_group}=...)")
    return problems


def check_command_line(argv: list[str]) -> None:
    """Exit with code 2 listing every unknown key, before Hydra starts (no-op for -m / --help / --cfg runs)."""
    args = [a for a in argv if not a.startswith("-")]
    if len(args) != len(argv):  # -m, --help, --cfg job, --info ...: Hydra's business
        return
    problems = unknown_keys(args)
    if problems:
        from trainer.log import print_error

        print_error(f"the command line has {len(problems)} unknown key{'s' * (len(problems) > 1)}:\n  "
                    + "\n  ".join(problems))
        sys.exit(2)
