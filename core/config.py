"""The closed config groups (trainer, data, regularize, monitor, expect) typed once with pydantic, with their
defaults (the trainer, regularize and data groups' default options, in Hydra's ConfigStore), durations parsed
once, and the one `compose(overrides)` every tool uses."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import BaseMetadata
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

CONF = Path(__file__).resolve().parents[1] / "conf"


class Allowed(BaseMetadata, str):
    """Annotated metadata: the words that say what a field allows, where its type alone does not say it."""


DURATION_WORDS = "steps (an int >= 0), epochs ('2ep') or a fraction of the run (a float in [0, 1])"


def parse_duration(value: Any) -> tuple[float, str]:
    """A duration -> (amount, unit: steps | epochs | fraction); ValueError when `value` is none ('5%' is 0.05)."""
    text = value.strip() if isinstance(value, str) else ""
    try:
        if text.endswith("ep"):
            amount, unit = float(text[:-2]), "epochs"
        elif text.endswith("%"):
            amount, unit = float(text[:-1]) / 100, "fraction"
        elif isinstance(value, str):
            return parse_duration(float(text) if "." in text else int(text))
        else:
            amount, unit = value, {int: "steps", float: "fraction"}.get(type(value))
    except ValueError:
        unit = None
    if unit is None or not (math.isfinite(amount) and amount >= 0 and (unit != "fraction" or amount <= 1)):
        raise ValueError(f"must be a duration: {DURATION_WORDS}")
    return amount, unit


def _duration(value: Any, positive: bool = False) -> Any:
    """The schema keeps the duration as written; parse_duration only checks it."""
    if parse_duration(value)[0] == 0 and positive:
        raise ValueError("zero")
    return value


Duration = Annotated[StrictInt | StrictFloat | StrictStr, AfterValidator(_duration), Allowed(
    "a duration: " + DURATION_WORDS)]
PositiveDuration = Annotated[StrictInt | StrictFloat | StrictStr, AfterValidator(partial(_duration, positive=True)),
                             Allowed("a positive duration: " + DURATION_WORDS)]
Unit = Annotated[float, Field(ge=0, lt=1)]  # [0, 1): dropout, label smoothing
# trainer.seed: torch generators take seeds in [-2**63, 2**64), and the samplers seed theirs with
# core/rng.step_seed(seed, step) = seed * 1000003 + step, which must stay below 2**64: 2**44 - 1 leaves 8e17 steps.
SEED_MAX = 2**44 - 1


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)


class TrainerConfig(Group):
    """The loop. Durations/intervals: steps (int), epochs ("1ep") or a fraction of the run (0.1)."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$"), Allowed(
        "auto, cpu, cuda, cuda:N or mps")] = Field("auto", description="auto = cuda > mps > cpu")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    max_epochs: int | None = Field(10, ge=1, description="ignored when max_steps is set")
    max_steps: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1, description="task.batch_size is split into this many micro-batches")
    log_interval: PositiveDuration = 50
    eval_interval: Duration = Field("1ep", description="0: only at the end")
    checkpoint_interval: Duration = Field("1ep", description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=0, description="newest step checkpoints kept (0 keeps all); best.pt apart")
    histogram_interval: Duration = Field("1ep", description="per-layer parameter and gradient histograms; 0: never")
    pictures: bool = Field(True, description="task pictures (VAE: reconstructions, samples, latent space) at evals")
    resume: str | None = Field(None, description="a run directory or checkpoint file; auto: this config's newest run")
    resume_allow_changes: bool = Field(False, description="resume although task/model/optimizer/seed... differ")
    resume_allow_data_changes: bool = Field(False, description="resume although the data differ (files added...)")
    existing_run: Literal["refuse", "move_aside"] = Field(
        "refuse", description="a fresh run into a directory holding another run: refuse | move it to previous_run_N/")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (null: torch's default)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms")
    compile: bool = Field(False, description="torch.compile the model")
    tf32: bool = Field(True, description="on CUDA, allow TF32 tensor cores for float32 matmuls")
    progress: Literal["auto", "rich", "plain", "off"] = Field("auto", description="auto: rich bar on a terminal")
    dry_run: bool = Field(False, description="print the composed config and derived numbers, then exit")
    nonfinite: Literal["raise", "skip"] = Field("raise", description="NaN/Inf loss or gradients: stop | skip step")
    max_nonfinite: int = Field(10, ge=1, description="stop after this many non-finite steps in a row")
    fp16_max_retries: int = Field(4, ge=0, description="amp=fp16: redo an overflowing batch at half the scale")
    fp16_min_scale: float = Field(1e-4, gt=0, description="... never below this scale; then skip the step")
    strategy: Literal["single", "ddp"] = Field("single", description="ddp: launch with torchrun --nproc_per_node=N")


class DataConfig(Group):
    """Loading a map-style Dataset (the small built-in tasks keep their data on the device and ignore these)."""

    root: str = Field("${oc.env:KILN_DATA_ROOT,data}", description="folder holding MNIST/raw/, tinyshakespeare/")
    download: Literal["auto"] | bool = Field("auto", description="auto: fetch when missing and the network allows")
    workers: int = Field(0, ge=0, description="DataLoader worker processes (0: in the training process)")
    pin_memory: Literal["auto"] | bool = Field("auto", description="page-locked batches (auto: on CUDA)")
    prefetch: int = Field(2, ge=1, description="batches each worker loads ahead")
    persistent_workers: bool = Field(True, description="keep the workers between evaluations")


class RegularizeConfig(Group):
    """Regularizers. Weight decay is applied by the optimizer (decoupled, e.g. AdamW) or as an L2 penalty in the loss
    (coupled); biases, norm weights and embeddings are not decayed unless asked. Augmentation: regularize=augment_*."""

    dropout: Unit = Field(0.0, description="one rate for the whole model")
    weight_decay: float = Field(0.0, ge=0)
    weight_decay_mode: Literal["coupled", "decoupled"] = Field(
        "decoupled", description="coupled: the L2 penalty (wd/2)*||p||^2 in the loss")
    decay_bias_and_norm: bool = False
    decay_embeddings: bool = Field(False, description="decay embedding tables (and a tied output head), as GPT-2")
    label_smoothing: Unit = Field(0.0, description="classification tasks (cross-entropy)")
    loss_reduction: str = "mean"  # the names of regularize/loss_reduction.py's REDUCTIONS (checked there)
    augment: dict | None = None  # a `_target_` node, bound against its target's signature


class MonitorConfig(Group):
    metric: str
    mode: Literal["min", "max"]


class Short(Group):
    overrides: list[Annotated[str, Field(pattern="=")]]
    target: float
    tolerance: float = Field(0.0, ge=0)
    measured: float | None = None
    wall_time_s: float | None = Field(None, gt=0)


class ExpectConfig(Group):
    """A recipe's declared result, checked by `python -m experiments.check_recipes`."""

    metric: str
    mode: Literal["min", "max"] = "min"
    target: float
    tolerance: float = Field(0.0, ge=0)
    device: Literal["cpu", "cuda", "any"] = "any"
    measured: float | None = None
    wall_time_s: float | None = Field(None, gt=0)  # seconds, `python train.py recipe=...` end to end
    measured_on: str | None = None
    short: Short | None = None


GROUPS: dict[str, type[Group]] = {"trainer": TrainerConfig, "data": DataConfig, "regularize": RegularizeConfig,
                                  "monitor": MonitorConfig, "expect": ExpectConfig}
for _group in ("trainer", "regularize", "data"):  # their default options (conf/train.yaml's defaults list names them)
    ConfigStore.instance().store(group=_group, name="default", node=GROUPS[_group]().model_dump())


def groups() -> set[str]:
    """The config groups: conf/'s folders and the groups registered in Hydra's ConfigStore."""
    return {p.name for p in CONF.iterdir() if p.is_dir()} | set(ConfigStore.instance().repo)


def options(group: str) -> list[str]:
    """A group's options: conf/<group>/*.yaml and the ones registered in Hydra's ConfigStore."""
    stored = ConfigStore.instance().repo.get(group, {})
    return sorted({p.stem for p in (CONF / group).glob("*.yaml")} | {n.removesuffix(".yaml") for n in stored})


def compose(overrides: list[str] | tuple[str, ...] = (), hydra: bool = False, struct: bool = True) -> DictConfig:
    """The config `python train.py <overrides>` runs (with the `hydra` node when `hydra`): in the Hydra already
    initialised (a test's, a tool's), else in one on conf/ for the call."""
    outer = GlobalHydra.instance().is_initialized()
    with contextlib.nullcontext() if outer else initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=hydra)
    OmegaConf.set_struct(cfg, struct)
    return cfg


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf; lists are leaves."""
    if isinstance(tree, Mapping):
        if not tree and prefix:
            return {prefix: {}}
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}
