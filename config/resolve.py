"""Values that cannot be resolved (a missing key or variable, a failing resolver, a cycle): why, and the fix."""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.basecontainer import BaseContainer
from omegaconf.errors import InterpolationKeyError, InterpolationToMissingValueError, UnsupportedInterpolationType

from config.bind import targets
from core.messages import closest, fmt, reason
from core.protocol import interpolated_from

_ABSENT = object()


def unresolvable(cfg: DictConfig) -> dict[str, str]:
    """Full key -> `key=expression: cannot be resolved: why; fix` for each value that does not resolve (not hydra's)."""
    failed: dict[str, tuple[str, Exception]] = {}

    def walk(node: DictConfig | ListConfig, path: str) -> None:
        for k in (node.keys() if isinstance(node, DictConfig) else range(len(node))):
            full, child = f"{path}.{k}" if path else str(k), node._get_node(k)
            if not path and k == "hydra":
                continue
            if OmegaConf.is_interpolation(node, k):
                try:
                    node[k]  # a value taken from elsewhere is checked where it is defined, not here again
                except Exception as e:
                    if "${hydra:" not in str(child._value()) or HydraConfig.initialized():  # known only in a run
                        failed[full] = (str(child._value()), e)
            elif child._is_missing():
                failed[full] = ("???", InterpolationToMissingValueError("a value is required here"))
            elif isinstance(child, DictConfig | ListConfig) and not child._is_none():
                walk(child, full)

    walk(cfg, "")
    if any(isinstance(e, UnsupportedInterpolationType) for _, e in failed.values()):
        # a task's module may register the resolver: import the targets' modules, as constructing them would
        new = {str(node._target_).rpartition(".")[0] for _, node in targets(cfg, "")} - set(sys.modules)
        for module in new:
            with contextlib.suppress(Exception):  # reported as a target that cannot be imported
                importlib.import_module(module)
        if any(module in sys.modules for module in new):
            return unresolvable(cfg)
    return {key: f"{key}={fmt(text, 200)}: cannot be resolved: {why(cfg, key, text, e, failed)}"
            for key, (text, e) in failed.items()}


def why(cfg: DictConfig, key: str, text: str, e: Exception, failed: Mapping[str, Any]) -> str:
    """Why the expression `text` at `key` does not resolve (`failed`: the other keys that do not), and the fix."""
    msg, refs = reason(e), interpolated_from(cfg, key)
    if "Recursive interpolation" in msg:
        chain = [key]  # key -> ... -> key, following each expression's first reference
        while len(chain) < 50 and chain[-1] not in chain[:-1]:
            chain.append(next(iter(interpolated_from(cfg, chain[-1])), key))
        return f"a reference cycle ({' -> '.join(chain)}); give one of these keys a value"
    if broken := [r for r in refs if r in failed]:
        return f"it refers to {broken[0]}, which cannot be resolved itself (see {broken[0]})"
    if env := re.search(r"Environment variable '([^']*)' not found", msg):
        return (f"the environment variable {env[1]} is not set; set it (export {env[1]}=...) or give a default: "
                f"${{oc.env:{env[1]},<default>}}")
    if isinstance(e, InterpolationKeyError):
        absent = [r for r in refs if OmegaConf.select(cfg, r, default=_ABSENT,
                                                      throw_on_resolution_failure=False) is _ABSENT]
        named = re.search(r"key '([^']*)'", msg)
        ref = absent[0] if absent else named[1] if named else msg
        parent, _, leaf = ref.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False)  # "" is the root
        close = closest(leaf, node if isinstance(node, DictConfig) else [])
        hint = (f"did you mean ${{{ref.removesuffix(leaf)}{close}}}?" if close
                else "refer to a key the config has (python train.py --cfg job lists them)")
        return f"the config has no key {ref}; {hint}"
    if text == "???":
        return "a value is required here; set it"
    if isinstance(e, InterpolationToMissingValueError):
        target = next(iter(refs), "the key it refers to")
        return f"it refers to {target}, which has no value (???); set {target}"
    if isinstance(e, UnsupportedInterpolationType):
        name, known = msg.rsplit(" ", 1)[-1], sorted(getattr(BaseContainer, "_resolvers", {}))
        close = closest(name, known)
        hint = f"did you mean {close}?" if close else f"the resolvers here: {', '.join(known)}"
        return f"no resolver is named {name!r}; {hint}"
    resolver = re.match(r"\$\{([\w.]+):", text)
    cause = re.sub(r"^(\w+) raised while resolving interpolation: ", r"\1: ", msg)
    what = f"the resolver {resolver[1]} failed" if resolver else "resolving it failed"
    return f"{what} ({cause}); fix the expression"
