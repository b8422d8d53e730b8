"""The command line, checked before Hydra starts: unknown keys, options listed twice, a required group deleted
(`~optimizer`), a run folder that cannot be made, and in a sweep (`-m`) every value of every job that cannot be
resolved. Reported like every other config error (all at once, did-you-mean, exit 2).

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
import re
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
        return deleted_groups(overrides)  # else an unknown option and the like: Hydra lists the choices
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


def required_groups() -> dict[str, list[str]]:
    """The groups every run has an option of (train.yaml's defaults with a non-null default) -> their options.
    `recipe` (null by default) is among them too: the defaults list interpolates it, so `~recipe` cannot compose."""
    groups = {}
    for entry in OmegaConf.load(CONF / "train.yaml").defaults:
        if isinstance(entry, DictConfig) and len(entry) == 1:
            group = str(next(iter(entry)))
            if " " not in group and "@" not in group and (entry[group] is not None or group == "recipe"):
                groups[group] = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    return groups


def deleted_groups(overrides: list[Override]) -> list[str]:
    """`~optimizer`: a run needs one option of each required group (Hydra fails on its defaults list)."""
    required = required_groups()
    problems = []
    for o in overrides:
        group = o.key_or_group
        if o.is_delete() and group in required:
            if group == "recipe":
                problems.append("~recipe: to run without a recipe, leave recipe out (or write recipe=null)")
                continue
            problems.append(f"~{group}: a run needs one option of the group {group}; pick an option: "
                            f"{group}=<name> ({', '.join(required[group])}; conf/{group}/)")
    return problems


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


def sweep_jobs(args: list[str]) -> tuple[list[list[str]], set[str]]:
    """The override list of every job of `python train.py -m <args>`, as Hydra's basic sweeper makes them (its
    `hydra.sweeper.params`, then the command line; globs over a group's options). A range the sweeper samples
    (Optuna's interval) keeps its default: a number cannot make an interpolation fail."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=loader)
    fixed = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
    hydra_cfg = compose("train", overrides=fixed, return_hydra_config=True).hydra
    params = hydra_cfg.sweeper.get("params")
    params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else {}
    lines = [f"{k}={v}" for k, v in params.items()] + args
    discrete = [o for o in parser.parse_overrides(lines) if not o.is_sweep_override() or o.is_discrete_sweep()]
    swept = {o.get_key_element() for o in discrete if o.is_sweep_override()}
    return [job for batch in BasicSweeper.split_arguments(discrete, None) for job in batch], swept


def sweep_unresolvable(args: list[str]) -> list[str]:
    """Every value that cannot be resolved in any job of a sweep, before the first job runs (each job would
    otherwise fail on its own and the sweep end with exit code 0). A job that does not compose is left to Hydra,
    which names the option it cannot find. Jobs that differ only in plain values (an LR grid) are composed once:
    a number or a word does not change which interpolations resolve."""
    from trainer.validate import unresolvable

    groups = {p.name for p in CONF.iterdir() if p.is_dir()}

    def shape(job: list[str]) -> tuple[str, ...]:
        return tuple(x.split("=", 1)[0] if x.split("=", 1)[0].split("@")[0] not in groups and "{" not in x else x
                     for x in job)

    found: dict[str, list[str]] = {}
    checked: dict[tuple[str, ...], list[str] | None] = {}
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            jobs, swept = sweep_jobs(args)
            for job in jobs:
                if shape(job) not in checked:
                    try:
                        checked[shape(job)] = list(unresolvable(compose("train", overrides=job)).values())
                    except HydraException:
                        checked[shape(job)] = None
                label = " ".join(re.sub(r"\\(.)", r"\1", x) for x in job if x.split("=", 1)[0] in swept)
                for line in checked[shape(job)] or []:
                    found.setdefault(line, []).append(label)
    except HydraException:
        return []
    return [line + ("" if len(where) == len(jobs) else f" (in the job{'s' * (len(where) > 1)}: {'; '.join(where)})")
            for line, where in found.items()]


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
    deleted = deleted_groups(overrides)
    unknown = unknown_keys(args) if not flags and not deleted else []
    problems = listed_twice(overrides) + deleted + unknown
    if not flags or multirun:
        problems += [x for x in [run_dir_problem(overrides, multirun)] if x]
    if multirun and not problems:
        problems += sweep_unresolvable(args)
    from core.log import print_error, print_warning

    for line in given_twice(overrides):
        print_warning(line)
    if problems:
        n = len(problems)
        what = "unknown key" if len(unknown) == n else "problem"
        print_error(f"the command line has {n} {what}{'s' * (n > 1)}:\n  " + "\n  ".join(problems))
        sys.exit(2)
