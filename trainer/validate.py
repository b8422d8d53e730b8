"""Config validation before anything runs: every problem at once, each as `full.key=value: what is allowed`.

`validate(cfg)` raises ConfigError (exit code 2) listing all problems, one per line; it never loads data and
never allocates on a device (it asks torch whether CUDA/MPS exist, nothing more). First every value that cannot
be resolved (`unresolvable`: a missing key, an unset environment variable, an unknown resolver, a resolver that
raises, a reference cycle) with its expression, why and the fix; the passes below step around those keys. Then
four passes:

1. Keys and values. Every node with a `_target_` is bound against its target's signature (unknown key ->
   did-you-mean; a missing required argument of a non-partial target); groups without one (trainer,
   regularize, data, monitor) are closed: their keys come from the schema (trainer/schema.py). Every value is
   checked by the first schema rule that matches its full key (ranges, choices, durations), or else against
   the type annotation of the target's parameter (`optimizer.foreach=yes` is not a bool). Interpolated values
   (`${regularize.weight_decay}`) are checked once, where they are defined.
2. Cross-key rules: max_steps or max_epochs set; grad_accum divides batch_size; the batch fits the data set;
   the schedule's durations fit the run when total steps are known without data (max_steps, or MNIST's 60000
   training images less the validation split); a val_* monitor needs a validation split (task.val_size > 0);
   early stopping / plateau need evaluations during the run (a non-zero interval); augmentation needs a task that
   takes it; n_embd divisible by n_head. What the task declares (its class attributes `norms`, `eval_metrics`,
   `test_metrics`, core/task.py): the norm is one its model can use; the metrics that early stopping, plateau,
   monitor and expect name are ones it reports, watched the right way (min/max). Lookahead does not wrap
   lookahead. Paths are of the right kind (data.root a folder, text_path a file) and trainer.resume exists.
3. The machine: the device exists; fp16 autocast needs a GPU; torch.compile needs Dynamo support, a C++
   compiler on CPU and Triton on CUDA; DDP has no MPS backend.
4. Cheap construction of the parts that hold no data (schedule with the run's Horizon, gradient transforms,
   early stopping, precision, norm layer, augmentation, and the optimizer on a 3-layer toy model), so each
   component's own argument checks run now instead of after the data has loaded. A node is constructed only
   when passes 1-3 found nothing wrong in it or in the keys it interpolates, so no problem is reported twice.

`oddities(cfg)` lists settings that run but probably do not do what was meant (an evaluation interval longer than
the run, early stopping or plateau with too few evaluations to ever act, more threads than cores); validate()
prints each once as a warning.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import shutil
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from core.errors import ConfigError
from core.protocol import interpolated_from
from trainer.schema import CLOSED_GROUPS, MNIST_TRAIN, TOP_LEVEL, closed_keys, duration_ok, is_int, matching_rule

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Leading positional arguments the trainer passes to `_partial_` factories (never config keys), left out of
# the did-you-mean suggestions.
SUPPLIED = {"params", "horizon", "num_features", "self"}
TARGET_GROUPS = ("task", "optimizer", "schedule", "norm", "amp", "early_stop")
_INTERP = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def fmt(value: Any, limit: int = 60) -> str:
    """A value as the user would write it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(fmt(v, limit) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {fmt(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"allowed: {', '.join(choices)}" if choices else "no keys are allowed here"


class Problems:
    """Problems by full key, in the order found; the first one for a key wins."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def add(self, key: str, message: str) -> None:
        self.items.setdefault(key, message)

    def under(self, prefixes: Iterable[str]) -> bool:
        """Any problem at or below one of `prefixes`."""
        return any(k == p or k.startswith(p + ".") or p.startswith(k + ".")
                   for k in self.items for p in prefixes)

    def lines(self) -> list[str]:
        return list(self.items.values())


_WARNED: set[str] = set()  # oddities already printed by this process (a sweep validates every job)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`; when it is valid, print its oddities (once each) as
    warnings and return None."""
    lines = problems(cfg)
    if lines:
        n = len(lines)
        raise ConfigError(f"the config has {n} problem{'s' * (n > 1)}:\n" + "\n".join(f"  {x}" for x in lines)
                          + "\nFix them on the command line (key=value) or in the YAML; "
                          "HYDRA_FULL_ERROR=1 shows a traceback.")
    from core.log import print_warning

    for line in oddities(cfg):
        if line not in _WARNED:
            _WARNED.add(line)
            print_warning(line)


def problems(cfg: DictConfig) -> list[str]:
    """Every problem in `cfg`, one line each ('full.key=value: what is allowed'); empty when valid."""
    p = Problems()
    try:
        for key, line in unresolvable(cfg).items():
            p.add(key, line)
        _check_structure(cfg, p)
        _check_cross_keys(cfg, p)
        _check_task_fit(cfg, p)
        _check_nesting(cfg, p)
        _check_paths(cfg, p)
        _check_machine(cfg, p)
        _check_construction(cfg, p)
    except Exception as e:  # a bug in a check must still end as a clear message, never a traceback
        p.add("<validator>", f"the config could not be checked completely ({type(e).__name__}: {e}); "
                             "please report this")
    return p.lines()


# --- pass 0: values that cannot be resolved -------------------------------------------------------------


def unresolvable(cfg: DictConfig, skip: Iterable[str] = ("hydra",)) -> dict[str, str]:
    """Every value of `cfg` whose interpolation cannot be resolved (a missing key, an unset environment variable,
    an unknown resolver, a resolver that raises, a reference cycle), wherever it came from: full key -> one line
    `key=expression: cannot be resolved: why; fix`. The top-level keys in `skip` are left out (the `hydra` node is
    resolved by Hydra itself, some of it only inside a run)."""
    from omegaconf.errors import UnsupportedInterpolationType

    failed: dict[str, tuple[str, Exception]] = {}

    def walk(node: DictConfig | ListConfig, path: str) -> None:
        for k in (node.keys() if isinstance(node, DictConfig) else range(len(node))):
            full = f"{path}.{k}" if path else str(k)
            if not path and k in skip:
                continue
            if OmegaConf.is_interpolation(node, k):
                try:
                    node[k]  # a value taken from elsewhere is checked where it is defined, not here again
                except Exception as e:
                    raw = str(node._get_node(k)._value())
                    if not ("${hydra:" in raw and not _in_hydra_run()):  # known only inside a Hydra run
                        failed[full] = (raw, e)
                continue
            child = node._get_node(k)
            if isinstance(child, DictConfig | ListConfig) and not child._is_none() and not child._is_missing():
                walk(child, full)

    walk(cfg, "")
    if any(isinstance(e, UnsupportedInterpolationType) for _, e in failed.values()) and _import_targets(cfg):
        return unresolvable(cfg, skip)  # a task's module may register the resolver when it is imported
    return {key: f"{key}={fmt(raw, 200)}: cannot be resolved: {_why(cfg, key, raw, e, failed)}"
            for key, (raw, e) in failed.items()}


def _import_targets(cfg: DictConfig) -> bool:
    """Import the module of every `_target_` not imported yet (as constructing the config would); True when one
    was."""
    import sys

    targets = [v for v in _targets(cfg) if isinstance(v, str) and "." in v]
    new = False
    for t in targets:
        module = t.rpartition(".")[0]
        if module not in sys.modules:
            try:
                importlib.import_module(module)
                new = True
            except Exception:
                pass  # reported by pass 1 as a target that cannot be imported
    return new


def _targets(node: Any) -> Iterator[Any]:
    """The raw values of every `_target_` key, without resolving anything."""
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
        for k in node:
            child = node._get_node(k)
            if k == "_target_" and not OmegaConf.is_interpolation(node, k):
                yield child._value()
            else:
                yield from _targets(child)
    elif isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
        for i in range(len(node)):
            yield from _targets(node._get_node(i))


def _in_hydra_run() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


def _references(key: str, raw: str) -> list[str]:
    """The keys `raw` (the expression at `key`) refers to, absolute (`${.lr}` next to `optimizer.x` is
    optimizer.lr)."""
    out = []
    for ref in re.findall(r"\$\{(\.*[A-Za-z_][\w.\[\]]*)\}", raw):
        dots = len(ref) - len(ref.lstrip("."))
        if dots:
            base = key.split(".")[:-dots]
            ref = ".".join([*base, ref.lstrip(".")])
        out.append(ref)
    return out


_ABSENT = object()


def _cycle(cfg: DictConfig, key: str) -> list[str] | None:
    """key -> ... -> key through plain references, or None."""
    def raw_at(k: str) -> str:
        node: Any = cfg
        try:
            for part in k.split("."):
                node = node._get_node(int(part) if isinstance(node, ListConfig) else part)
            return str(node._value())
        except Exception:
            return ""

    def follow(k: str, seen: list[str]) -> list[str] | None:
        for ref in _references(k, raw_at(k)):
            if ref == key:
                return [*seen, ref]
            if ref not in seen:
                found = follow(ref, [*seen, ref])
                if found:
                    return found
        return None

    return follow(key, [key])


def _why(cfg: DictConfig, key: str, raw: str, e: Exception, failed: Mapping[str, Any] | None = None) -> str:
    """Why the expression `raw` at `key` does not resolve, and the fix."""
    from omegaconf.errors import InterpolationKeyError, InterpolationToMissingValueError, UnsupportedInterpolationType

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Recursive interpolation" in text:
        chain = _cycle(cfg, key)
        loop = " -> ".join(chain) if chain else key
        return f"a reference cycle ({loop}); give one of these keys a value"
    broken = [r for r in _references(key, raw) if r in (failed or {})]
    if broken:
        return f"it refers to {broken[0]}, which cannot be resolved itself (see {broken[0]})"
    env = re.search(r"Environment variable '([^']*)' not found", text)
    if env:
        name = env.group(1)
        return (f"the environment variable {name} is not set; set it (export {name}=...) or give a default: "
                f"${{oc.env:{name},<default>}}")
    if isinstance(e, InterpolationKeyError):
        absent = [r for r in _references(key, raw) if OmegaConf.select(cfg, r, default=_ABSENT,
                                                                         throw_on_resolution_failure=False) is _ABSENT]
        named = re.search(r"key '([^']*)'", text)
        ref = absent[0] if absent else named.group(1) if named else text
        parent, _, leaf = ref.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False) if parent else cfg
        keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, keys, n=1)
        hint = (f"did you mean ${{{parent + '.' if parent else ''}{close[0]}}}?" if close
                else "refer to a key the config has (python train.py --cfg job lists them)")
        return f"the config has no key {ref}; {hint}"
    if isinstance(e, InterpolationToMissingValueError):
        target = next(iter(_references(key, raw)), "the key it refers to")
        return f"it refers to {target}, which has no value (???); set {target}"
    if isinstance(e, UnsupportedInterpolationType):
        name = text.rsplit(" ", 1)[-1]
        from omegaconf.basecontainer import BaseContainer

        known = sorted(getattr(BaseContainer, "_resolvers", {}))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"the resolvers here: {', '.join(known)}"
        return f"no resolver is named {name!r}; {hint}"
    resolver = re.match(r"\$\{([\w.]+):", raw)
    cause = re.sub(r"^(\w+) raised while resolving interpolation: ", r"\1: ", text)
    what = f"the resolver {resolver.group(1)} failed" if resolver else "resolving it failed"
    return f"{what} ({cause}); fix the expression"


# --- pass 1: keys and values -----------------------------------------------------------------------------


def _check_structure(cfg: DictConfig, p: Problems) -> None:
    for key in cfg:
        if key == "hydra":
            continue
        if key not in TOP_LEVEL:
            p.add(str(key), f"{key}={fmt(_raw(cfg, key))}: unknown top-level key; {did_you_mean(str(key), TOP_LEVEL)}")
    from trainer.cli_check import required_groups

    for group, options in required_groups().items():
        if group != "recipe" and group not in cfg:  # ~group: the trainer reads every one of them
            p.add(group, f"{group}: missing (~{group}?); a run needs one option of the group {group}; pick an option: "
                         f"{group}=<name> ({', '.join(options)}; conf/{group}/)")
    for group in TOP_LEVEL:
        if group not in cfg:
            continue
        if not _usable(cfg, group, group, p):
            continue
        node = cfg[group]
        if group in CLOSED_GROUPS:
            _check_node(node, group, p, closed=closed_keys(group))
        elif group == "clip":
            _check_clip(node, p)
        elif isinstance(node, DictConfig) and "_target_" in node:
            _check_node(node, group, p)
        elif isinstance(node, DictConfig) and len(node) == 0 and group == "early_stop":
            continue  # early_stop=off
        elif node is None and group == "norm":
            continue  # norm=model: every model keeps its own normalization
        else:
            p.add(group, f"{group}={fmt(_raw(cfg, group))}: expected a config node with a _target_ "
                         f"(pick an option: {group}=<name>, see conf/{group}/)")


def _check_clip(node: Any, p: Problems) -> None:
    if node is None:
        return
    if not isinstance(node, DictConfig):
        p.add("clip", f"clip={fmt(node)}: expected gradient transforms by name (clip=[value,norm], see conf/clip/)")
        return
    for name in node:
        key = f"clip.{name}"
        if not _usable(node, name, key, p):
            continue
        child = node[name]
        if isinstance(child, DictConfig) and "_target_" in child:
            _check_node(child, key, p)
        else:
            p.add(key, f"{key}={fmt(_raw(node, name))}: expected a gradient transform node with a _target_ "
                       "(add transforms with clip=[name,...], see conf/clip/)")


def _raw(node: DictConfig, key: Any) -> Any:
    """A child's value for messages: resolved when possible, else its raw text."""
    try:
        value = node[key]
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    except Exception:
        return node._get_node(key)._value()


def _usable(node: DictConfig, key: Any, full: str, p: Problems) -> bool:
    """False (with a problem) when the child is missing (???) or its interpolation does not resolve."""
    if OmegaConf.is_missing(node, key):
        p.add(full, f"{full}=???: a value is required here")
        return False
    try:
        node[key]
    except Exception as e:
        raw = str(node._get_node(key)._value())
        p.add(full, f"{full}={fmt(raw, 200)}: cannot be resolved: {_why(node._get_root(), full, raw, e)}")
        return False
    return True


def _check_node(node: DictConfig, path: str, p: Problems, closed: Sequence[str] | None = None) -> None:
    """One config node: its keys against its target's signature (or the closed key list), then every value."""
    target, hints = None, {}
    if "_target_" in node:
        if p.under([f"{path}._target_"]):
            return  # the target does not resolve (pass 0)
        info = _target_info(node, path, p)
        if info is None:
            return  # the target itself is wrong: its keys cannot be judged
        target, names, hints = info
    for key in node:
        key = str(key)
        full = f"{path}.{key}"
        if key in HYDRA_KEYS:
            continue
        if closed is not None and key not in closed:
            p.add(full, f"{full}={fmt(_raw(node, key))}: unknown key in {path}; {did_you_mean(key, closed)}")
            continue
        if target is not None and names is not None and key not in names:
            p.add(full, f"{full}={fmt(_raw(node, key))}: unknown key for {target}; "
                        f"{did_you_mean(key, set(names) - SUPPLIED)}")
            continue
        if p.under([full]):
            continue  # a value that does not resolve (pass 0), or below one
        if OmegaConf.is_interpolation(node, key):
            _usable(node, key, full, p)  # its value is checked where it is defined
            continue
        if not _usable(node, key, full, p):
            continue
        child = node[key]
        if isinstance(child, DictConfig) and "_target_" in child:
            _check_node(child, full, p)
            continue
        value = OmegaConf.to_container(child, resolve=True) if isinstance(child, DictConfig | ListConfig) else child
        spec = matching_rule(full)
        if spec is not None:
            if not spec(value):
                p.add(full, f"{full}={fmt(value)}: must be {spec.allowed}")
        elif key in hints:
            allowed = _fits(value, hints[key])
            if allowed is not None:
                p.add(full, f"{full}={fmt(value)}: must be {allowed} (the type of `{key}` in {target})")
        elif isinstance(child, DictConfig) and closed is None:
            _check_node(child, full, p)


def _locate(target: str) -> Any:
    """What `instantiate` would call for `_target_: a.b.c` (Hydra's own lookup)."""
    from hydra._internal.utils import _locate as locate  # get_object without its error log

    return locate(target)


def _target_info(node: DictConfig, path: str, p: Problems) -> tuple[str, set[str] | None, dict[str, Any]] | None:
    """(target name, accepted key names or None when it takes **kwargs, type hints); None when it fails."""
    key = f"{path}._target_"
    target = node.get("_target_")
    if not isinstance(target, str) or not target:
        p.add(key, f"{key}={fmt(target)}: must be the dotted path of a class or function")
        return None
    try:
        obj = _locate(target)
    except Exception:
        module, _, name = target.rpartition(".")
        try:
            names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
            why, hint = f"module {module!r} has no {name!r}", did_you_mean(name, names)
            hint = "; " + hint if "did you mean" in hint else ""
        except Exception as e:
            why, hint = f"{type(e).__name__}: {e}", ""
        p.add(key, f"{key}={fmt(target)}: cannot be imported ({why}){hint}")
        return None
    if not callable(obj):
        p.add(key, f"{key}={fmt(target)}: is not a class or function")
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return target, None, {}  # no signature to bind against (a builtin): keys cannot be checked
    params = list(sig.parameters.values())
    if any(q.kind is q.VAR_KEYWORD for q in params):
        names = None  # takes **kwargs: any key is accepted, so no unknown-key check is possible for it
    else:
        names = {q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)}
    if not node.get("_partial_", False):  # called with the config's keys only: required ones must be there
        for q in params:
            if (q.default is q.empty and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)
                    and q.name not in node):
                p.add(f"{path}.{q.name}", f"{path}.{q.name}: missing; {target} requires it")
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:
        hints = {}  # unresolvable annotations: the schema rules still apply, type hints do not
    return target, names, hints


_TYPE_WORDS = {int: "an int", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _fits(value: Any, hint: Any) -> str | None:
    """None when `value` fits the annotation `hint` (or the hint is beyond this checker); else what is allowed."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar | str):
        return None
    if origin is typing.Union or origin is types.UnionType:
        words = []
        for arm in args:
            w = _fits(value, arm)
            if w is None:
                return None
            words.append(w)
        return " or ".join(dict.fromkeys(words))
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(fmt(a) for a in args)
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if hint is int:
        return None if is_int(value) else "an int"
    if hint in (bool, str, type(None)):
        return None if type(value) is hint or (hint is type(None) and value is None) else _TYPE_WORDS[hint]
    seq_types = (list, tuple, Sequence, Iterable, typing.Sequence, typing.Iterable)
    if hint in seq_types or origin in seq_types:
        if isinstance(value, Mapping):
            return None  # e.g. a param-group spec: beyond this checker
        if not isinstance(value, list | tuple):
            return "a list"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"a list of {len(args)} values"
            for v, a in zip(value, args):
                w = _fits(v, a)
                if w is not None:
                    return f"a list of {len(args)} values, each {w}"
            return None
        if args:
            for v in value:
                w = _fits(v, args[0])
                if w is not None:
                    return f"a list of values, each {w}"
        return None
    if hint is Callable or origin in (Callable, typing.Callable):
        return None if value is None or isinstance(value, Mapping) or callable(value) else "a node with a _target_"
    if inspect.isclass(hint) and hint.__module__.startswith("torch"):
        return "a number" if hint.__name__ == "Tensor" else None
    return None


# --- pass 2: cross-key rules -----------------------------------------------------------------------------


def _get(cfg: DictConfig, key: str, p: Problems) -> Any:
    """The value at `key` when it exists and has no problem; else None."""
    if p.under([key]):
        return None
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    except Exception:
        return None  # a value inside does not resolve: reported in pass 0


def train_size(cfg: DictConfig, p: Problems | None = None) -> int | None:
    """The training-set size when it is known without loading data (MNIST's 60000 images), else None."""
    p = p or Problems()
    target = _get(cfg, "task._target_", p)
    if target in ("tasks.mnist_vae.MnistVAE", "tasks.mnist_cnn.MnistCNN"):  # both hold out val_size (5000)
        val = _get(cfg, "task.val_size", p)
        val = 5000 if val is None and "val_size" not in cfg.task else val
        return MNIST_TRAIN - val if is_int(val) and 0 <= val < MNIST_TRAIN else None
    return None


def horizon_numbers(cfg: DictConfig, p: Problems | None = None) -> tuple[int | None, int | None]:
    """(total steps, steps per epoch) as far as they are known without data (None where not)."""
    p = p or Problems()
    n, batch = train_size(cfg, p), _get(cfg, "task.batch_size", p)
    spe = None
    if n is not None and is_int(batch) and 0 < batch <= n:
        spe = n // batch  # EpochSampler drops the incomplete last batch
    max_steps, max_epochs = _get(cfg, "trainer.max_steps", p), _get(cfg, "trainer.max_epochs", p)
    if is_int(max_steps):
        return max_steps, spe
    if is_int(max_epochs) and spe is not None:
        return max_epochs * spe, spe
    return None, spe


def _check_cross_keys(cfg: DictConfig, p: Problems) -> None:
    if "trainer" not in cfg or "task" not in cfg or not isinstance(cfg.trainer, DictConfig):
        return
    t = cfg.trainer
    if not p.under(["trainer.max_steps", "trainer.max_epochs"]) \
            and t.get("max_steps") is None and t.get("max_epochs") is None:
        p.add("trainer.max_steps", "trainer.max_steps=null, trainer.max_epochs=null: set one of them (an int >= 1)")
    batch, accum = _get(cfg, "task.batch_size", p), _get(cfg, "trainer.grad_accum", p)
    if is_int(batch) and is_int(accum) and batch % accum:
        p.add("trainer.grad_accum", f"trainer.grad_accum={accum}: must divide task.batch_size={batch} (each "
                                    "optimizer batch is split into grad_accum equal micro-batches)")
    n = train_size(cfg, p)
    if n is not None and is_int(batch) and batch > n:
        p.add("task.batch_size", f"task.batch_size={batch}: must be <= the training set ({n} samples)")
    heads, width = _get(cfg, "task.n_head", p), _get(cfg, "task.n_embd", p)
    if is_int(heads) and is_int(width) and heads > 0 and width % heads:
        p.add("task.n_embd", f"task.n_embd={width}: must be a multiple of task.n_head={heads}")

    # Without a validation split evaluations score the test set: nothing reports a val_* metric.
    val, metric = _get(cfg, "task.val_size", p), _get(cfg, "monitor.metric", p)
    if val == 0 and is_int(val):
        if _get(cfg, "task._target_", p) == "tasks.mnist_cnn.MnistCNN":
            p.add("task.val_size", "task.val_size=0: the CNN evaluates on its validation split; use >= 1")
        elif isinstance(metric, str) and metric.startswith("val_"):
            p.add("monitor.metric", f"monitor.metric={fmt(metric)}: task.val_size=0 leaves no validation split, so "
                                    "evaluations report test_* metrics; set task.val_size > 0 (selection on "
                                    "validation) or monitor.metric=test_loss (recipe=mnist_vae_baseline)")

    # Metric-driven parts need evaluations during the run (an interval as long as the run: see oddities()).
    evals = _get(cfg, "trainer.eval_interval", p)
    needs = _metric_driven(cfg, p)
    if needs and evals is not None and duration_ok(evals) and _steps(evals, 10**9, 10**6) == 0:
        p.add("trainer.eval_interval", f"trainer.eval_interval={fmt(evals)}: {needs[0]} needs evaluations "
                                       f"during the run (a non-zero interval){needs[1]}")


def _metric_driven(cfg: DictConfig, p: Problems) -> tuple[str, str] | None:
    """(what, the alternative) for the part of the run that acts on evaluations, if any."""
    if isinstance(cfg.get("early_stop"), DictConfig) and "_target_" in cfg.early_stop:
        return "early stopping", " or early_stop=off"
    if _get(cfg, "schedule._target_", p) == "schedules.plateau":
        return "schedule=plateau", ""
    return None


def _eval_every(cfg: DictConfig, evals: Any, p: Problems) -> int | None:
    """trainer.eval_interval in steps, when the run's length is known without data."""
    total, spe = horizon_numbers(cfg, p)
    if total is None or (spe is None and isinstance(evals, str) and evals.strip().endswith("ep")):
        return None
    return _steps(evals, total, spe or 1)


# --- what the task declares, nesting, paths -----------------------------------------------------------------


def _task_class(cfg: DictConfig, p: Problems) -> type | None:
    target = _get(cfg, "task._target_", p)
    try:
        obj = _locate(target) if isinstance(target, str) else None
    except Exception:
        return None  # reported in pass 1
    return obj if inspect.isclass(obj) else None


def _check_task_fit(cfg: DictConfig, p: Problems) -> None:
    """The norm and the metrics the config names, against what the task class declares (no data loaded)."""
    cls = _task_class(cfg, p)
    if cls is None:
        return
    task = f"{cls.__module__}.{cls.__qualname__}"
    norms, kind = getattr(cls, "norms", None), _get(cfg, "norm.kind", p)
    if norms is not None and isinstance(kind, str) and kind not in norms:
        p.add("norm.kind", f"norm.kind={fmt(kind)} (norm={kind}): the task {task} cannot use it; it takes "
                           + ", ".join(f"norm={k}" for k in norms))
    batch, accum = _get(cfg, "task.batch_size", p), _get(cfg, "trainer.grad_accum", p)
    ranks = int(os.environ.get("WORLD_SIZE", "1")) if _get(cfg, "trainer.strategy", p) == "ddp" else 1
    if kind == "batchnorm" and is_int(batch) and is_int(accum) and accum > 0 and batch % accum == 0 \
            and batch // (accum * ranks) == 1:
        p.add("norm.kind", f"norm.kind='batchnorm' (norm=batchnorm) with micro-batches of 1 sample (task.batch_size="
                           f"{batch} / trainer.grad_accum={accum}" + (f" / {ranks} ranks" if ranks > 1 else "")
                           + "): BatchNorm cannot normalise a single sample in training; use a larger task.batch_size, "
                             "a smaller trainer.grad_accum, or norm=layernorm")
    declare = getattr(cls, "declared_metrics", None)
    if callable(declare):
        node = cfg.get("task")
        settings = {str(k): _get(cfg, f"task.{k}", p) for k in node} if isinstance(node, DictConfig) else {}
        declared_evals, declared_tests = declare(settings)
    else:
        declared_evals, declared_tests = getattr(cls, "eval_metrics", None), getattr(cls, "test_metrics", None)
    evals = dict(declared_evals or {})
    if not evals:
        return  # the task declares nothing: its metrics are checked when it evaluates
    every = {**evals, **dict(declared_tests or {})}
    _check_metric(cfg, p, task, "monitor.metric", every, every, "use")
    if _get(cfg, "early_stop._target_", p) is not None:
        _check_metric(cfg, p, task, "early_stop.monitor", evals, every, "early stopping needs")
    if isinstance(cfg.get("schedule"), DictConfig) and "monitor" in cfg.schedule:
        _check_metric(cfg, p, task, "schedule.monitor", evals, every, "the schedule needs")
    if isinstance(cfg.get("expect"), DictConfig) and "metric" in cfg.expect:
        _check_metric(cfg, p, task, "expect.metric", every, every, "use")


def _check_metric(cfg: DictConfig, p: Problems, task: str, key: str, allowed: Mapping[str, str],
                  every: Mapping[str, str], who: str) -> None:
    """`key` names one of `allowed` (metric -> min | max), and its sibling `mode` key agrees with the metric."""
    if p.under(interpolated_from(cfg, key)):
        return  # the key it interpolates is reported already
    metric = _get(cfg, key, p)
    if not isinstance(metric, str):
        return
    name = metric[5:] if metric.startswith("eval/") and metric[5:] in allowed and key == "schedule.monitor" \
        else metric
    via = "".join(f" (from ${{{r}}})" for r in interpolated_from(cfg, key))
    if name not in allowed:
        if name in every:
            why = f"the task {task} scores {metric} once, at the end, not at each evaluation"
        else:
            why = f"the task {task} does not report {metric!r}"
            hint = did_you_mean(metric, allowed)
            why += f" ({hint})" if hint.startswith("did you mean") else ""
        kind = "one of its metrics" if allowed == every else "an evaluation metric"
        p.add(key, f"{key}={fmt(metric)}{via}: {why}; {who} {kind}: "
                   + " or ".join(f"{key}={m}" for m in allowed))
        return
    mode_key = key.rsplit(".", 1)[0] + ".mode"
    mode = _get(cfg, mode_key, p)
    if mode in ("min", "max") and mode != allowed[name] and not p.under(interpolated_from(cfg, mode_key)):
        better = "lower" if allowed[name] == "min" else "higher"
        via = "".join(f" (from ${{{r}}})" for r in interpolated_from(cfg, mode_key))
        p.add(mode_key, f"{mode_key}={fmt(mode)}{via}: {better} {name} is better (the task {task} declares it), "
                        f"so {mode} would keep the worst value; use {mode_key}={allowed[name]}")


def _check_nesting(cfg: DictConfig, p: Problems) -> None:
    """Lookahead inside Lookahead: both wrappers share one set of param groups, so the outer k and alpha are
    ignored (setdefault keeps the inner's) and the shared step counter moves twice per step."""
    from optim.lookahead import Lookahead

    def is_lookahead(node: DictConfig, path: str) -> bool:
        target = node.get("_target_") if "_target_" in node else None
        if not isinstance(target, str) or p.under([f"{path}._target_"]):
            return False
        try:
            obj = _locate(target)
        except Exception:
            return False
        return inspect.isclass(obj) and issubclass(obj, Lookahead)

    def walk(node: Any, path: str, outer: str | None) -> None:
        if not isinstance(node, DictConfig):
            return
        here = is_lookahead(node, path)
        if here and outer is not None:
            p.add(f"{path}._target_", f"{path}._target_={fmt(node._target_)}: lookahead inside lookahead ({outer}) "
                                      "is not supported: both wrap the same param groups, so the outer k and alpha "
                                      "are ignored and the step counter moves twice per step; wrap a plain "
                                      f"optimizer: optimizer@{path}=adamw (or another option)")
            return
        for k in node:
            if str(k) not in HYDRA_KEYS:
                try:
                    child = node[k]
                except Exception:
                    continue  # does not resolve: reported in pass 1
                walk(child, f"{path}.{k}", path if here else outer)

    if isinstance(cfg.get("optimizer"), DictConfig):
        walk(cfg.optimizer, "optimizer", None)


def _check_paths(cfg: DictConfig, p: Problems) -> None:
    """Paths that exist but are of the wrong kind (their absence is the task's to report, with the download
    hint), and a resume source that does not exist."""
    for key, want in (("data.root", "folder"), ("task.data_root", "folder"), ("task.text_path", "file")):
        if p.under(interpolated_from(cfg, key)):
            continue
        value = _get(cfg, key, p)
        if not isinstance(value, str) or not value:
            continue
        path, shown = Path(value).expanduser(), f"{key}={fmt(value, 1000)}"
        if want == "folder" and path.exists() and not path.is_dir():
            p.add(key, f"{shown}: is a file, not a folder; point {key} at the folder that holds MNIST/raw/ and "
                       "tinyshakespeare/ (data.root=/path/to/data or export KILN_DATA_ROOT=/path/to/data)")
        elif want == "file" and path.is_dir():
            p.add(key, f"{shown}: is a folder, not a file; give a UTF-8 text file: {key}=/path/to/file.txt")
    resume = _get(cfg, "trainer.resume", p)
    if isinstance(resume, str) and resume != "auto":
        how = ("pass a run folder that has checkpoints, a checkpoint file, trainer.resume=auto (the newest run "
               "with the same config) or trainer.resume=null (a fresh run)")
        if not resume.strip():
            p.add("trainer.resume", f"trainer.resume={fmt(resume)}: names no checkpoint; {how}")
        elif not Path(resume).expanduser().exists():
            p.add("trainer.resume", f"trainer.resume={fmt(resume, 1000)}: no such file or folder; {how}")


def _steps(value: Any, total: int, spe: int) -> int | None:
    from schedules.horizon import Horizon

    try:
        return Horizon(total_steps=total, steps_per_epoch=spe).steps(value)
    except Exception:
        return None


# --- pass 3: the machine ---------------------------------------------------------------------------------


def effective_device(name: str) -> str:
    """What trainer.device resolves to here, as a type name (cuda, mps or cpu), without touching a device."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return name.split(":")[0]


def _check_machine(cfg: DictConfig, p: Problems) -> None:
    import torch

    name = _get(cfg, "trainer.device", p)
    if not isinstance(name, str):
        return
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            p.add("trainer.device", f"trainer.device={fmt(name)}: CUDA is not available here; use auto or cpu")
            return
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            p.add("trainer.device", f"trainer.device={fmt(name)}: this machine has {torch.cuda.device_count()} "
                                    f"CUDA device(s): use cuda:0..cuda:{torch.cuda.device_count() - 1}")
            return
    if name == "mps" and not torch.backends.mps.is_available():
        p.add("trainer.device", f"trainer.device={fmt(name)}: MPS is not available here; use auto or cpu")
        return
    device = effective_device(name)
    where = f"trainer.device={name}" + (f" (resolves to {device} here)" if name == "auto" else "")

    if _get(cfg, "amp.dtype", p) == "float16" and device == "cpu":
        p.add("amp", f"amp=fp16 with {where}: fp16 autocast + GradScaler need a GPU; use amp=bf16 or amp=off on CPU")

    if _get(cfg, "trainer.compile", p) is True:
        # Conservative: only setups where torch.compile is known to fail at the first forward.
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            p.add("trainer.compile", "trainer.compile=true: torch.compile (Dynamo) is not supported by this "
                                     "Python/torch build; use trainer.compile=false")
        elif device == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "clang++",
                                                                                            "c++"))):
            p.add("trainer.compile", f"trainer.compile=true with {where}: TorchInductor on CPU needs a C++ compiler "
                                     "(g++ or clang++, or set CXX); install one or use trainer.compile=false")
        elif device == "cuda" and importlib.util.find_spec("triton") is None:
            p.add("trainer.compile", f"trainer.compile=true with {where}: TorchInductor on CUDA needs Triton "
                                     "(pip install triton) or trainer.compile=false")
        # mps: recent torch compiles for MPS (Metal kernels); not rejected here.

    if _get(cfg, "trainer.strategy", p) == "ddp" and device == "mps":
        p.add("trainer.strategy", f"trainer.strategy=ddp with {where}: torch.distributed has no MPS backend; "
                                  "use trainer.strategy=single")


# --- pass 4: cheap construction --------------------------------------------------------------------------


def _message(key: str, node: DictConfig, e: BaseException) -> str:
    """A component's own error as a problem line: prefixed with the full key of the first config key the
    message names (`Invalid mode: 'x'` -> `optimizer.mode='x': Invalid mode: 'x' (optim.adalo.AdaLo)`)."""
    e = e.__cause__ or e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if msg.startswith((key + ".", key + "=", key.split(".")[0] + ".")):
        return msg  # the component already names the key
    keys = {str(k) for k in node if str(k) not in HYDRA_KEYS}
    named = next((w for w in re.findall(r"[A-Za-z_]\w*", msg) if w in keys), None)
    if named is not None:
        return f"{key}.{named}={fmt(node[named])}: {msg} ({node._target_})"
    return f"{key} ({node._target_}): {msg}"


def _check_construction(cfg: DictConfig, p: Problems) -> None:
    from hydra.utils import instantiate

    def attempt(key: str, build: Callable[[Any], Any]) -> None:
        node = OmegaConf.select(cfg, key)
        if not isinstance(node, DictConfig) or "_target_" not in node or p.under([f"{key}._target_"]) \
                or any(k.startswith(key + ".") and k.endswith("._target_") for k in p.items):
            return  # a wrong target, here or nested: nothing sensible to build
        try:
            clean, dropped = _without_problems(node, key, p)
        except Exception:
            return  # does not resolve: reported in pass 1
        try:
            build(instantiate(clean))
        except Exception as e:
            cause = e.__cause__ or e
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
            where = _holder(clean, unknown.group(1), key) if isinstance(cause, TypeError) and unknown else None
            if where is not None:  # a target taking **kwargs passed it on to one that does not take it
                path, holder, k = where
                names = _param_names(_locate(holder._target_)) | set(holder) - {k} - HYDRA_KEYS
                p.add(f"{path}.{k}", f"{path}.{k}={fmt(holder[k])}: unknown key for {holder._target_}; "
                                     f"{did_you_mean(k, names - SUPPLIED)}")
            elif dropped and isinstance(cause, TypeError) and "missing" in str(cause):
                return  # a required key was left out because it is already reported
            elif not any(re.search(rf"\b{re.escape(d)}\b", str(cause)) for d in dropped):
                p.add(key, _message(key, clean, e))  # new: the keys reported already were left out

    total, spe = horizon_numbers(cfg, p)
    sched = cfg.get("schedule")
    if total is not None and isinstance(sched, DictConfig):
        try:
            uses_epochs = any(isinstance(v, str) and v.strip().endswith("ep") for v in _leaves(sched))
        except Exception:
            uses_epochs = None  # a value that does not resolve (reported in pass 0): nothing to build
        if uses_epochs is not None and (spe is not None or not uses_epochs):
            from schedules import Horizon

            horizon = Horizon(total_steps=total, steps_per_epoch=spe or 1)
            attempt("schedule", lambda made: made(horizon))
    clip = cfg.get("clip")
    for name in clip if isinstance(clip, DictConfig) else []:
        attempt(f"clip.{name}", lambda made: made)
    attempt("early_stop", lambda made: made)
    attempt("amp", lambda made: made)
    attempt("norm", lambda made: made(4))
    if not p.under(["regularize.decay_bias_and_norm"]):
        attempt("optimizer", lambda made: _check_coupled_decay(made(_toy_groups(cfg)), cfg, p))
    if isinstance(cfg.get("regularize"), DictConfig) and cfg.regularize.get("augment") is not None:
        attempt("regularize.augment", _build_augment)


def _holder(node: DictConfig, k: str, path: str) -> tuple[str, DictConfig, str] | None:
    """The (path, node) of the `_target_` node holding key `k` (the first found, depth first)."""
    for name, child in node.items():
        if isinstance(child, DictConfig):
            found = _holder(child, k, f"{path}.{name}")
            if found:
                return found
    return (path, node, k) if k in node and "_target_" in node else None


def _param_names(obj: Any) -> set[str]:
    """The names a callable takes by keyword (empty when it has no signature)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)}


def _without_problems(node: DictConfig, key: str, p: Problems) -> tuple[DictConfig, list[str]]:
    """The node resolved, minus the keys already reported (and keys interpolating them): those take the
    target's defaults, so the construction reports only what is new. Returns (node, the keys left out)."""
    raw = OmegaConf.to_container(node, resolve=False)
    resolved = OmegaConf.to_container(node, resolve=True)
    dropped: list[str] = []

    def prune(raw_d: dict, res_d: dict, path: str) -> None:
        for k in list(res_d):
            full, r = f"{path}.{k}", raw_d.get(k)
            refs = set(_INTERP.findall(r)) if isinstance(r, str) else set()
            if full in p.items or (refs and p.under(refs)):
                del res_d[k]
                dropped.append(str(k))
            elif isinstance(res_d[k], dict) and isinstance(r, dict):
                prune(r, res_d[k], full)

    prune(raw, resolved, key)
    return OmegaConf.create(resolved), dropped


def _leaves(node: Any) -> Iterator[Any]:
    if isinstance(node, DictConfig | ListConfig):
        for v in (node.values() if isinstance(node, DictConfig) else node):
            yield from _leaves(v)
    else:
        yield node


def _build_augment(factory: Callable[..., Any]) -> Any:
    """Call the augmentation factory as MnistCNN does (no arguments)."""
    try:
        return factory()
    except TypeError as e:  # a factory that needs task facts (vocab size): its arguments cannot be checked here
        if "missing" in str(e):
            return None
        raise


def _check_coupled_decay(optimizer: Any, cfg: DictConfig, p: Problems) -> None:
    """regularize.weight_decay_mode=coupled needs an optimizer with weight decay (regularize/weight_decay.py)."""
    from regularize.weight_decay import coupled_weight_decay

    reg = cfg.get("regularize")
    keys = ["regularize.weight_decay_mode", "regularize.weight_decay"]
    if not isinstance(reg, DictConfig) or reg.get("weight_decay_mode") != "coupled" or p.under(keys):
        return
    try:
        coupled_weight_decay(optimizer, "coupled", reg.get("weight_decay") or 0.0)
    except ValueError as e:
        p.add("regularize.weight_decay_mode", str(e))


def _toy_groups(cfg: DictConfig) -> list[dict[str, Any]]:
    """The trainer's param groups for a tiny model (hidden matrix, norm, head): optimizers check their
    arguments when constructed, and some (Muon) route parameters by role."""
    import torch
    from torch import nn

    from optim.param_groups import config_param_groups

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with torch.no_grad():
        return config_param_groups(model, cfg.regularize)




# --- oddities: valid, but probably not what was meant ---------------------------------------------------------


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def oddities(cfg: DictConfig) -> list[str]:
    """Settings that run but probably do not do what was meant, one line each: warnings, not errors, because
    each is a legitimate choice in some run (a smoke test shorter than an epoch evaluates only at its end, and
    early stopping or plateau then never act; the run is still right)."""
    p, lines = Problems(), []
    total = horizon_numbers(cfg, p)[0]
    evals = _get(cfg, "trainer.eval_interval", p)
    every = _eval_every(cfg, evals, p) if evals is not None and duration_ok(evals) else None
    needs = _metric_driven(cfg, p)
    if every and total and every > total and not needs:
        lines.append(f"trainer.eval_interval={fmt(evals)} is {every} steps, longer than the run ({total} steps): "
                     "the only evaluation is the final one (trainer.eval_interval=0 says so without this warning)")
    if every and total and needs:
        stop = needs[0] == "early stopping"
        key = "early_stop.patience" if stop else "schedule.patience"
        effect = "early stopping can never stop it" if stop else "reduce-on-plateau can never lower the learning rate"
        evaluations = (total - 1) // every  # evaluations before the last step (that one decides nothing)
        patience = _get(cfg, key, p)
        # early stopping: the first evaluation sets the best, then `patience` (at least 1) without improvement stop
        # the run; plateau: more than `patience` without improvement lower the LR.
        needed = (max(patience, 1) + 1 if stop else patience + 2) if is_int(patience) else 1
        if evaluations == 0:
            length = "the whole run" if every == total else f"longer than the run ({total} steps)"
            lines.append(f"trainer.eval_interval={fmt(evals)} is {every} steps, {length}: the run does not evaluate "
                         f"before its end, so {effect}; use a shorter interval")
        elif evaluations < needed:
            lines.append(f"{key}={patience}: the run evaluates {evaluations} time{'s' * (evaluations != 1)} "
                         f"before its end (every {every} of {total} steps), so {effect} (that takes {needed}); "
                         f"evaluate more often (trainer.eval_interval) or lower {key}")
    threads, cores = _get(cfg, "trainer.threads", p), _cores()
    if is_int(threads) and threads > cores:
        lines.append(f"trainer.threads={threads}: this machine has {cores} core{'s' * (cores > 1)} for this "
                     f"process; more threads than cores slow torch down; use trainer.threads=null (torch's "
                     f"default) or at most {cores}")
    return lines


__all__ = ["ConfigError", "effective_device", "fmt", "horizon_numbers", "oddities", "problems", "train_size",
           "unresolvable", "validate"]
