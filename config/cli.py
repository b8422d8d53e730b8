"""The command line, checked before Hydra starts (DESIGN.md says why); a key given twice is only a warning."""

from __future__ import annotations

import contextlib
import itertools
import re
import tempfile
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from config.resolve import unresolvable
from core.config import CONF, compose, groups, options
from core.log import print_error, print_warning
from core.messages import closest


def required_groups() -> dict[str, list[str]]:
    """The groups every run has an option of (train.yaml's non-null defaults) -> their options."""
    entries = [e for e in OmegaConf.load(CONF / "train.yaml").defaults if isinstance(e, DictConfig) and len(e) == 1]
    return {g: options(g) for e in entries for g in map(str, e) if " " not in g and "@" not in g and e[g] is not None}


def unknown_keys(args: list[str]) -> list[str]:
    """One message per plain override whose key is not in the composed config."""
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return []  # a syntax error: Hydra's own message says where
    named, problems = groups(), []
    picks = [o for o in overrides if o.type is not OverrideType.CHANGE or o.key_or_group.startswith("hydra")
             or o.key_or_group.split("@")[0] in named]  # group options, `+key`, `~key` and Hydra's own keys
    try:
        cfg = compose([o.input_line for o in picks if o.key_or_group == "hydra.searchpath"
                       or not o.key_or_group.startswith("hydra")])
    except HydraException:
        return deleted_groups(overrides)  # else an unknown option and the like: Hydra lists the choices
    for o in [o for o in overrides if o not in picks]:
        parent_key, _, leaf = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key)
        if not isinstance(parent, DictConfig):
            problems.append(f"{o.key_or_group}: unknown key ({parent_key or 'the config'} has no such section)")
        elif leaf not in parent:
            close = closest(leaf, parent)
            hint = f"; did you mean '{o.key_or_group.removesuffix(leaf)}{close}'?" if close else ""
            problems.append(f"{o.key_or_group}={o.value()}: unknown key{hint} "
                            f"(to add a new key on purpose: +{o.key_or_group}=...)")
    return problems


def listed_twice(overrides: list[Override]) -> list[str]:
    """`group=[a,a]`: Hydra merges the option into one node, so the run would apply it once."""
    problems, named = [], groups()
    for o in (o for o in overrides if o.key_or_group in named):
        for choice in o.value().list if isinstance(o.value(), ChoiceSweep) else [o.value()]:
            if isinstance(choice, list) and (twice := [x for i, x in enumerate(choice) if x in choice[:i]]):
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
    return [f"{key} is given {'twice' if len(given) == 2 else f'{len(given)} times'} on the command line ("
            + ", then ".join(o.input_line.split("=", 1)[1] if "=" in o.input_line else "(deleted)" for o in given)
            + "): the last one is used" for key, given in by_key.items() if len(given) > 1]


def deleted_groups(overrides: list[Override]) -> list[str]:
    """`~group`: a run needs an option of each required group, and `~recipe` cannot compose (the defaults use it)."""
    required = required_groups()
    return ["~recipe: to run without a recipe, leave recipe out (or write recipe=null)" if o.key_or_group == "recipe"
            else f"~{o.key_or_group}: a run needs one option of the group {o.key_or_group}; pick an option: "
                 f"{o.key_or_group}=<name> ({', '.join(required[o.key_or_group])}; conf/{o.key_or_group}/)"
            for o in overrides if o.is_delete() and o.key_or_group in {*required, "recipe"}]


def run_dir_problem(overrides: list[Override], multirun: bool) -> str | None:
    """Why the run (or sweep) folder cannot be created, or None; only its part before an interpolation is known."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.value() for o in overrides if o.key_or_group == key]
    raw = given[-1] if given else OmegaConf.load(CONF / "train.yaml").hydra[key.split(".")[1]]._get_node("dir")._value()
    static = raw.split("${", 1)[0] if isinstance(raw, str) else ""
    if not static:
        return None
    folder = Path.cwd() / Path(static).expanduser()
    folder = folder.parent if "${" in raw and not static.endswith("/") else folder  # runs/x_${now:...}
    existing = next(d for d in (folder, *folder.parents) if d.exists())
    fix = f"choose another folder: {key}=</path/to/folder>"
    if not existing.is_dir():
        return f"{key}={raw!r}: cannot be created: {existing} is a file, not a folder; {fix}"
    try:
        Path(tempfile.mkdtemp(prefix=".kiln-probe-", dir=existing)).rmdir()
    except OSError as e:
        return f"{key}={raw!r}: cannot be created: nothing can be written in {existing} ({e.strerror or e}); {fix}"
    return None


def sweep_unresolvable(args: list[str]) -> list[str]:
    """Every value that cannot be resolved in any job of a sweep (`hydra.sweeper.params`, then the command line).
    A sampled range keeps its default; jobs that differ only in plain values (an LR grid) are composed once."""
    parser = OverridesParser.create()
    try:
        fixed = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
        params = OmegaConf.to_container(compose(fixed, hydra=True).hydra.sweeper).get("params") or {}
        lines = [o for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + args)
                 if not o.is_sweep_override() or o.is_discrete_sweep()]
    except HydraException:
        return []
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in lines]
    swept, named = {o.get_key_element() for o in lines if o.is_sweep_override()}, groups()
    jobs = list(itertools.product(*axes))
    found, checked = {}, {}  # line -> the jobs it is in; a job's shape -> its lines
    for job in jobs:
        shape = tuple(x.split("=", 1)[0] if x.split("=", 1)[0].split("@")[0] not in named and "{" not in x else x
                      for x in job)
        if shape not in checked:
            checked[shape] = []  # a job that does not compose: Hydra names the option it cannot find
            with contextlib.suppress(HydraException):
                checked[shape] = list(unresolvable(compose(job)).values())
        label = " ".join(re.sub(r"\\(.)", r"\1", x) for x in job if x.split("=", 1)[0] in swept)
        for line in checked[shape]:
            found.setdefault(line, []).append(label)
    return [line + ("" if len(where) == len(jobs) else f" (in the job{'s' * (len(where) > 1)}: {'; '.join(where)})")
            for line, where in found.items()]


def check_command_line(argv: list[str]) -> None:
    """Exit with code 2 listing every problem; warn of keys given twice. --help, --cfg...: left to Hydra."""
    flags, args = [a for a in argv if a.startswith("-")], [a for a in argv if not a.startswith("-")]
    multirun = bool(flags) and set(flags) <= {"-m", "--multirun"}
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return  # a syntax error: Hydra's own message says where
    deleted = deleted_groups(overrides)
    unknown = unknown_keys(args) if not flags and not deleted else []
    problems = listed_twice(overrides) + deleted + unknown
    if not flags or multirun:
        problems += [x for x in [run_dir_problem(overrides, multirun)] if x]
    if multirun and not problems:
        problems += sweep_unresolvable(args)
    for line in given_twice(overrides):
        print_warning(line)
    if problems:
        n, what = len(problems), "unknown key" if len(unknown) == len(problems) else "problem"
        print_error(f"the command line has {n} {what}{'s' * (n > 1)}:\n  " + "\n  ".join(problems))
        raise SystemExit(2)
