"""Parameter groups chosen by module type: no weight decay on biases, norm weights and embeddings.

Choosing by type (not by parameter name) works for any model: a LayerNorm's weight is a scale, not a
feature detector, and shrinking it towards zero fights the normalisation it implements.

`param_groups` also tags every parameter with its role (`param_role(p)`): "hidden" for the >=2-D weights of
hidden layers, "head" for the output layer, "embedding", "norm" for the scales (weights) of normalisation layers,
and "other" (biases, norm shifts, scalars).
Optimizers for hidden matrices only (Muon, optim/muon.py) route by that role. The output head is any module
that sets `is_output_head = True`; when no module does, it is the model's last nn.Linear (in registration
order, as `model.modules()` lists them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NO_DECAY_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, InstanceNorm, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(t for t in NO_DECAY_TYPES if t not in EMBEDDING_TYPES)
# Param-group entries that optimizers update as they run: state, not hyperparameters, so a resume that changes
# hyperparameters keeps them. By the package of the optimizer's class; torch's schedulers and ours hold for any.
RUNNING_GROUP_KEYS = {
    "torch": {"initial_lr"}, "optim": {"lookahead_step", "loss_ema"},  # LR schedulers; Lookahead, AdaLo
    "prodigyopt": {"d", "d_max", "d_numerator", "d_denom", "d_hat", "k"},
    "dadaptation": {"d", "k", "numerator_weighted"},
    "schedulefree": {"k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"},
    "pytorch_optimizer": {"step"},
}


def running_group_keys(optimizer: Any) -> set[str]:
    """The param-group entries of `optimizer` that a resume must not overwrite with the new config's."""
    package = type(optimizer).__module__.split(".")[0]
    return RUNNING_GROUP_KEYS["torch"] | RUNNING_GROUP_KEYS["optim"] | RUNNING_GROUP_KEYS.get(package, set())


ROLE_ATTR = "_kiln_role"  # attribute set on each nn.Parameter by tag_roles()


def output_heads(model: nn.Module) -> list[nn.Module]:
    """Modules marked `is_output_head = True`; otherwise the last nn.Linear of the model (or none)."""
    marked = [m for m in model.modules() if getattr(m, "is_output_head", False)]
    if marked:
        return marked
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def tag_roles(model: nn.Module) -> None:
    """Set each parameter's role (see the module docstring). Embedding and head win over hidden for shared
    (tied) weights, since a tied embedding/head matrix is both."""
    heads = {id(m) for m in output_heads(model)}
    rank = {"other": 0, "norm": 0, "hidden": 1, "head": 2, "embedding": 3}
    roles: dict[int, tuple[nn.Parameter, str]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, EMBEDDING_TYPES):
                role = "embedding"
            elif id(module) in heads:
                role = "head"
            elif p.ndim >= 2 and not isinstance(module, NO_DECAY_TYPES) and not name.endswith("bias"):
                role = "hidden"
            elif isinstance(module, NORM_TYPES) and name == "weight":
                role = "norm"
            else:
                role = "other"
            old = roles.get(id(p))
            if old is None or rank[role] > rank[old[1]]:
                roles[id(p)] = (p, role)
    for p, role in roles.values():
        setattr(p, ROLE_ATTR, role)


def param_role(p: torch.Tensor) -> str | None:
    """The role tag_roles() gave p, or None for a tensor that was never tagged."""
    return getattr(p, ROLE_ATTR, None)


def param_groups(model: nn.Module, decay_bias_and_norm: bool = False,
                 decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Two groups: `decay` (weights of Linear/Conv/...) and `no_decay` (biases, norms, embeddings).

    The no_decay group sets weight_decay=0; the decay group inherits the optimizer's weight_decay. Returns a
    single group when `decay_bias_and_norm` is True; `decay_embeddings` moves embedding tables (and so a tied
    output head) to the decay group, as GPT-2/nanoGPT do. Shared parameters are listed once. Every parameter is
    tagged with its role (tag_roles) on the way.
    """
    tag_roles(model)
    if decay_bias_and_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            embedding = isinstance(module, EMBEDDING_TYPES)
            if (embedding and not decay_embeddings) or (not embedding and (
                    isinstance(module, NO_DECAY_TYPES) or name.endswith("bias") or p.ndim < 2)):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "name": "decay"},
              {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def config_param_groups(model: nn.Module, regularize: Any) -> list[dict[str, Any]]:
    """param_groups() as the `regularize` config node asks (decay_bias_and_norm, decay_embeddings)."""
    return param_groups(model, decay_bias_and_norm=bool(regularize.get("decay_bias_and_norm", False)),
                        decay_embeddings=bool(regularize.get("decay_embeddings", False)))
