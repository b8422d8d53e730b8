"""The config bound to what it names: closed groups to their pydantic models, `_target_` nodes to their targets."""

from __future__ import annotations

import contextlib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from core.config import GROUPS, Allowed
from core.messages import closest, did_you_mean, fmt, reason
from core.protocol import interpolated_from

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
SUPPLIED = {"params", "horizon", "num_features", "self"}  # what the trainer passes to `_partial_` factories
BOUND = ("task", "optimizer", "schedule", "norm", "clip", "amp", "early_stop", "average")  # `_target_` groups
TOP_LEVEL = (*BOUND, *GROUPS)
Problems = dict[str, str]  # full key -> its line; the first found for a key wins


def describe(hint: Any, meta: Iterable[Any] = ()) -> str:
    """What a type annotation (with pydantic/annotated_types metadata) allows, in words."""
    meta, origin, args = list(meta), typing.get_origin(hint), typing.get_args(hint)
    if any(isinstance(m, Allowed) for m in meta):
        return next(str(m) for m in meta if isinstance(m, Allowed))
    if origin is typing.Annotated:
        return describe(args[0], [*meta, *args[1:]])
    if origin in (typing.Union, types.UnionType):
        arms = [describe(a, meta) for a in args if a is not type(None)]
        return ("null or " if type(None) in args else "") + " or ".join(dict.fromkeys(arms))
    if origin is typing.Literal:
        return "one of " * (len(args) > 1) + ", ".join(map(str, args))
    if hint in (bool, str, type(None)):
        return {bool: "true or false", str: "a string", type(None): "null"}[hint]
    if hint in (int, float):
        kind = "an int" if hint is int else "a number"
        b = {type(m): m for m in meta if isinstance(m, Ge | Gt | Le | Lt)}
        lo = ("[", ">=", b[Ge].ge) if Ge in b else ("(", ">", b[Gt].gt) if Gt in b else None
        hi = ("]", b[Le].le) if Le in b else (")", b[Lt].lt) if Lt in b else None
        return f"{kind} in {lo[0]}{lo[2]}, {hi[1]}{hi[0]}" if lo and hi else f"{kind} {lo[1]} {lo[2]}" if lo else kind
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list" + (f" of {len(args)} values, each {describe(args[0])}" if origin is tuple and args
                           and args[-1] is not Ellipsis else "")
    return getattr(hint, "__name__", str(hint))


def check_groups(cfg: DictConfig, p: Problems, required: Mapping[str, list[str]]) -> None:
    """Top-level keys, required groups and the closed groups' values (their pydantic models)."""
    for key in map(str, cfg):
        if key != "hydra" and key not in TOP_LEVEL:
            p.setdefault(key, f"{key}={fmt(resolved(cfg, key))}: unknown top-level key; {did_you_mean(key, TOP_LEVEL)}")
    for group, options in required.items():
        if group not in cfg:  # ~group: the trainer reads every one of them
            p.setdefault(group, f"{group}: missing (~{group}?); a run needs one option of the group {group}; pick "
                                f"an option: {group}=<name> ({', '.join(options)}; conf/{group}/)")
    for name, model in GROUPS.items():
        try:
            if name in cfg and not under(p, name):
                model.model_validate(OmegaConf.to_container(cfg[name], resolve=True))
        except ValidationError as e:
            for err in e.errors():  # loc: the field path, then (in a union) the arm's type
                key, info, m = name, None, model
                for part in err["loc"]:
                    if part not in getattr(m, "model_fields", {}):
                        break
                    key, info = f"{key}.{part}", m.model_fields[part]
                    m = next((a for a in (info.annotation, *typing.get_args(info.annotation))
                              if inspect.isclass(a) and issubclass(a, BaseModel)), None)
                leaf, value = str(err["loc"][-1]), resolved(cfg, key)
                if err["type"] == "extra_forbidden":
                    p.setdefault(f"{key}.{leaf}", f"{key}.{leaf}={fmt(err['input'])}: unknown key in {key}; "
                                                  f"{did_you_mean(leaf, m.model_fields if m else [])}")
                elif info is not None:
                    p.setdefault(key, f"{key}={fmt(value) if err['type'] != 'missing' else '???'}: must be "
                                      f"{describe(info.annotation, info.metadata)}")


def resolved(node: DictConfig, key: str) -> Any:
    """The value at the dotted `key` below `node`, resolved (a node as plain data); None if absent or unresolvable."""
    with contextlib.suppress(Exception):
        value = OmegaConf.select(node, key, default=None)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    return None


def under(p: Problems, *prefixes: str) -> bool:
    """Any problem at, below or above one of `prefixes`."""
    return any(k == q or k.startswith(q + ".") or q.startswith(k + ".") for k in p for q in prefixes)


def targets(node: Any, key: str) -> Iterable[tuple[str, DictConfig]]:
    """Every `_target_` node at or below `node`, with its full key (a `_target_` interpolation is left out)."""
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
        if "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
            yield key, node
        for k in node:
            if not OmegaConf.is_interpolation(node, k):
                yield from targets(node._get_node(k), f"{key}.{k}")


def bind(node: DictConfig, key: str, p: Problems) -> None:
    """Keys against the target's signature, values against its type hints."""
    try:
        obj = get_object(node._target_)
    except Exception as e:
        module, _, name = str(node._target_).rpartition(".")
        try:
            close = closest(name, [n for n in dir(get_object(module)) if not n.startswith("_")])
            why = f"module {module!r} has no {name!r})" + (f"; did you mean '{close}'?" if close else "")
        except Exception:
            why = f"{type(e).__name__}: {e})"
        p.setdefault(f"{key}._target_", f"{key}._target_={fmt(node._target_)}: cannot be imported ({why}")
        return
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return  # no signature to bind against (a builtin)
    hints = {}
    with contextlib.suppress(Exception):  # annotations that do not evaluate: the keys are still checked
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    kwargs = any(q.kind is q.VAR_KEYWORD for q in params.values())
    named = [n for n, q in params.items() if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
    for n in [] if node.get("_partial_", False) else named:  # a `_partial_` factory gets the rest later
        if params[n].default is params[n].empty and n not in node:
            p.setdefault(f"{key}.{n}", f"{key}.{n}: missing; {node._target_} requires it")
    for k in map(str, node):
        full = f"{key}.{k}"
        if k in HYDRA_KEYS or under(p, full) or OmegaConf.is_interpolation(node, k):
            continue  # an interpolated value is checked where it is defined
        if k not in params and not kwargs:
            p.setdefault(full, f"{full}={fmt(resolved(node, k))}: unknown key for {node._target_}; "
                               f"{did_you_mean(k, set(named) - SUPPLIED)}")
        elif k in hints and not isinstance(node[k], DictConfig) and not fits(resolved(node, k), hints[k]):
            p.setdefault(full, f"{full}={fmt(resolved(node, k))}: must be {describe(hints[k])} (the type of `{k}` in "
                               f"{node._target_})")


def fits(value: Any, hint: Any) -> bool:
    """`value` fits the annotation (strictly: 'yes' is no bool); True when pydantic cannot judge the hint."""
    try:
        adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True, strict=True))
        for v in [value, tuple(value)] if isinstance(value, list) else [value]:  # YAML has no tuples
            with contextlib.suppress(ValidationError):
                adapter.validate_python(v)
                return True
        return False
    except Exception:
        return True


def construct(cfg: DictConfig, key: str, build: Callable[[Any], Any], p: Problems) -> None:
    """instantiate(node) and `build` it; when that fails, name the key (or keys) that break it and their defaults.
    Keys already reported (or interpolating one) stay at their defaults, so no problem is reported twice."""
    tree = resolved(cfg, key)
    if not isinstance(tree, dict) or "_target_" not in tree or any(
            k.startswith(key + ".") and k.endswith("._target_") for k in p):
        return
    spare: dict[str, tuple[Any, Any, str]] = {}  # path -> (value, the default, target)

    def walk(d: dict, path: str) -> None:
        params = inspect.signature(get_object(d["_target_"])).parameters
        for k, v in d.items():
            if isinstance(v, dict) and "_target_" in v:
                walk(v, f"{path}{k}.")
            elif k not in HYDRA_KEYS and (k not in params or params[k].default is not params[k].empty):
                spare[path + k] = (v, params[k].default if k in params else params, d["_target_"])

    def attempt(keep: Iterable[str]) -> Exception | None:
        def prune(d: dict, path: str) -> dict:
            return {k: prune(v, f"{path}{k}.") if isinstance(v, dict) else v for k, v in d.items()
                    if path + k not in spare or path + k in keep}
        try:
            build(instantiate(prune(tree, "")))
        except Exception as e:
            return e.__cause__ or e
        return None

    walk(tree, "")
    kept = [k for k in spare if not under(p, f"{key}.{k}", *interpolated_from(cfg, f"{key}.{k}"))]
    first = attempt(kept)
    if first is None:
        return
    if attempt([]) is not None:  # broken even at its defaults: the node as a whole
        msg = reason(first)
        p.setdefault(key, msg if msg.startswith(key.split(".")[0] + ".") else f"{key} ({tree['_target_']}): {msg}")
        return
    good: list[str] = []
    for k in kept:
        (value, default, target), full, e = spare[k], f"{key}.{k}", attempt([*good, k])
        if e is None:
            good.append(k)
        elif isinstance(default, Mapping):  # not a parameter: a **kwargs target passed it on
            p.setdefault(full, f"{full}={fmt(value)}: unknown key for {target}; "
                               f"{did_you_mean(k.rpartition('.')[2], set(default) - SUPPLIED)}")
        else:
            msg = reason(e)
            for shown in (f"{full}={value!r}", f"{full}={fmt(value)}", full):
                msg = msg.removeprefix(shown).lstrip(" :")
            p.setdefault(full, f"{full}={fmt(value)}: {msg}; the default is {full}={fmt(default)} ({target})")
