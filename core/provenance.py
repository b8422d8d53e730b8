"""Where each value of a run's config came from, for its manifest: an option's YAML, the recipe, or the command line.

Hydra composes (conf/train.yaml) each group's option, the recipe's file, the recipe's values for the options it
names (recipes/<recipe>/<group>/<option>.yaml, merged only when that option is chosen), the sweep preset, and last
the command line. `config_sources` reconstructs that record from Hydra's choices and the recipe files; None when the
config cannot have come from these overrides alone (a program built or edited it).
"""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.config import CONF, compose, flatten, groups

RECIPES = CONF / "recipe"
ORDER = ("conf/<group>/<option>.yaml < recipes/<recipe>.yaml and recipes/<recipe>/<group>/<option>.yaml "
         "(the chosen options only) < sweep preset < command line")


def config_sources(cfg: DictConfig, overrides: list[str]) -> dict[str, Any] | None:
    """{order, options, recipe, from_recipe, recipe_not_applied, sweep, from_command_line}: every value not listed
    under from_recipe or from_command_line is its option's YAML (or conf/train.yaml). A recipe's `expect` block (its
    declared result, which the run does not use) is left out."""
    choices = _choices(cfg, tuple(overrides))
    if choices is None:
        return None
    recipe = choices.get("recipe")
    options = {g: v for g, v in sorted(choices.items())
               if not g.startswith(("hydra/", "recipe")) and g != "sweep" and v is not None}
    if "clip" in cfg and "clip" not in options:  # a list of transforms: Hydra keeps no choice for it
        options["clip"] = list(cfg.clip or [])
    command_line = _command_line(overrides)
    from_recipe: dict[str, Any] = {}
    not_applied: dict[str, list[str]] = {}
    if recipe:
        own = OmegaConf.load(RECIPES / f"{recipe}.yaml")
        own_values = {k: v for k, v in OmegaConf.to_container(own).items() if k not in ("defaults", "expect")}
        from_recipe.update(flatten(own_values))
        for folder in sorted(p for p in (RECIPES / recipe).glob("*") if p.is_dir()):
            group, chosen = folder.name, str(options.get(folder.name))
            for file in sorted(folder.glob("*.yaml")):
                if file.stem == chosen:
                    from_recipe.update(flatten(OmegaConf.to_container(OmegaConf.load(file)), group))
                else:
                    not_applied.setdefault(group, []).append(file.stem)
        from_recipe = {k: v for k, v in from_recipe.items()
                       if not any(k == c or k.startswith(c + ".") for c in command_line)}
    return {"order": ORDER, "options": options, "recipe": recipe, "from_recipe": from_recipe,
            "recipe_not_applied": not_applied, "sweep": choices.get("sweep"), "from_command_line": command_line}


def _choices(cfg: DictConfig, overrides: tuple[str, ...]) -> dict[str, Any] | None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():  # inside train.py: the running job's own composition
        return OmegaConf.to_container(HydraConfig.get().runtime.choices)
    from hydra.errors import HydraException

    try:
        composed, choices = _compose(overrides)
    except HydraException:  # e.g. a task found through a hydra.searchpath that is not among these overrides
        return None
    return choices if composed == OmegaConf.to_container(cfg) else None


@functools.lru_cache(maxsize=8)
def _compose(overrides: tuple[str, ...]) -> tuple[dict, dict]:
    """(the config without its hydra node, Hydra's choices) for `python train.py <overrides>`."""
    cfg = compose(overrides, hydra=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"}, choices


def _command_line(overrides: list[str]) -> dict[str, Any]:
    """key -> value of every override that sets a value (picks of an option are under `options`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    named = groups()
    values = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key.startswith("hydra") or (key in named and not o.is_delete()):
            continue
        values[key] = "<deleted>" if o.is_delete() else o.value()
    return values

