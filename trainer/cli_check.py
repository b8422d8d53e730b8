"""The command line, checked before Hydra starts: unknown keys, options listed twice, a run folder that cannot be
made. Reported like every other config error (all at once, did-you-mean, exit 2).

Hydra composes in struct mode and stops at the first override whose key is not in the config, with exit code 1
and no suggestion. Before handing over to Hydra, train.py composes the config once with only the overrides that
pick options (`group=option`, `+key=`, `~key`), then checks every plain `key=value` against the result.
Sweeps (`-m`) are left to Hydra: their values are lists and ranges.

Hydra also merges silently what it cannot represent: `clip=[norm,norm]` becomes one `clip.norm` node (an error:
the run would not do what the command says), and a key given twice keeps its last value (a warning: appending
`key=value` to a long command to change it is common). A run folder that cannot be created (a file in its path,
a read-only parent) stops Hydra with a traceback: it is checked here, by making and removing a probe folder
where the run folder would go.
"""

from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
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


def listed_twice(overrides: list[Override]) -> list[str]:
    """`group=[a,a]`: Hydra merges the option into one node, so the run would apply it once."""
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    problems = []
    for o in overrides:
        if o.key_or_group not in groups:
            continue
        value = o.value()
        for choice in value.list if isinstance(value, ChoiceSweep) else [value]:
            if not isinstance(choice, list):
                continue
            twice = [x for i, x in enumerate(choice) if x in choice[:i]]
            if twice:
                group, once = o.key_or_group, ",".join(str(x) for x in dict.fromkeys(choice))
                problems.append(f"{group}=[{','.join(str(x) for x in choice)}]: lists {twice[0]} twice, but an "
                                f"option is one config node ({group}.{twice[0]}), so Hydra keeps one and the run "
                                f"would apply it once; list each option once: {group}=[{once}]")
    return problems


def given_twice(overrides: list[Override]) -> list[str]:
    """Warnings for keys given more than once: Hydra keeps the last value."""
    by_key: dict[str, list[Override]] = {}
    for o in overrides:
        by_key.setdefault(o.get_key_element().lstrip("+~"), []).append(o)
    lines = []
    for key, given in by_key.items():
        if len(given) > 1:
            values = ", then ".join(o.input_line.split("=", 1)[1] if "=" in o.input_line else "(deleted)"
                                    for o in given)
            times = "twice" if len(given) == 2 else f"{len(given)} times"
            lines.append(f"{key} is given {times} on the command line ({values}): the last one is used")
    return lines


def run_dir_problem(overrides: list[Override], multirun: bool) -> str | None:
    """Why the run (or sweep) folder cannot be created, or None. Only the part before the first interpolation
    (`runs/` of `runs/${now:...}`) can be checked before Hydra resolves it."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o for o in overrides if o.key_or_group == key]
    try:
        raw = given[-1].value() if given else OmegaConf.load(CONF / "train.yaml").hydra[key.split(".")[1]]._get_node(
            "dir")._value()
    except Exception:
        return None
    if not isinstance(raw, str) or not raw.split("${", 1)[0]:
        return None
    static = raw.split("${", 1)[0]
    folder = Path(static).expanduser()
    if "${" in raw and not static.endswith("/"):
        folder = folder.parent  # runs/x_${now:...}: the folder that will hold it
    existing = folder if folder.is_absolute() else Path.cwd() / folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = f"choose another folder: {key}=</path/to/folder>"
    if not existing.is_dir():
        return f"{key}={raw!r}: cannot be created: {existing} is a file, not a folder; {fix}"
    try:
        Path(tempfile.mkdtemp(prefix=".kiln-probe-", dir=existing)).rmdir()
    except OSError as e:
        return f"{key}={raw!r}: cannot be created: nothing can be written in {existing} ({e.strerror or e}); {fix}"
    return None


def check_command_line(argv: list[str]) -> None:
    """Exit with code 2 listing every problem, before Hydra starts; print warnings for keys given twice. Unknown
    keys are checked for single runs only; --help, --cfg and the like are left to Hydra."""
    flags = [a for a in argv if a.startswith("-")]
    args = [a for a in argv if not a.startswith("-")]
    multirun = bool(flags) and set(flags) <= {"-m", "--multirun"}
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return  # a syntax error: Hydra's own message says where
    unknown = unknown_keys(args) if not flags else []
    problems = listed_twice(overrides) + unknown
    if not flags or multirun:
        problems += [x for x in [run_dir_problem(overrides, multirun)] if x]
    from trainer.log import print_error, print_warning

    for line in given_twice(overrides):
        print_warning(line)
    if problems:
        n = len(problems)
        what = "unknown key" if len(unknown) == n else "problem"
        print_error(f"the command line has {n} {what}{'s' * (n > 1)}:\n  " + "\n  ".join(problems))
        sys.exit(2)
