"""Config validation (trainer/validate.py): bad command lines get one clear line each, all at once, exit code 2.

The table runs in-process (compose + validate); a few cases run the real CLI to prove exit code, stderr and the
absence of a traceback. Hydra itself rejects some command lines before our validator sees them (a key that is
not in the config without `+`, an unknown option, unparseable syntax): those exit with code 1 and Hydra's own
message; the second table pins those messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from tests.conftest import ROOT, run_cli
from trainer.errors import ConfigError
from trainer.validate import problems, validate

GROUPS = ["task", "optimizer", "schedule", "norm", "regularize", "clip", "amp", "early_stop", "trainer"]


@pytest.fixture(scope="module")
def make() -> Iterator[Callable[..., DictConfig]]:
    """compose_cfg (tests/conftest.py) inside one Hydra initialisation: the same config, composed faster."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        def _make(*overrides: str) -> DictConfig:
            cfg = compose("train", overrides=list(overrides))
            OmegaConf.set_struct(cfg, False)
            return cfg

        yield _make


# (command line, the line the validator must print). Exact fragments: key=value and what is allowed.
BAD = [
    # optimizer
    ("optimizer.lr=-1", "optimizer.lr=-1: must be a number > 0"),
    ("optimizer.lr=0", "optimizer.lr=0: must be a number > 0"),
    ("optimizer.lr=abc", "optimizer.lr='abc': must be a number > 0"),
    ("optimizer.lr=nan", "optimizer.lr=nan: must be a number > 0"),
    ("+optimizer.lrr=0.1", "optimizer.lrr=0.1: unknown key for optim.adamw.adamw; did you mean 'lr'?"),
    ("optimizer=adam +optimizer.lrr=0.1", "optimizer.lrr=0.1: unknown key for torch.optim.Adam; did you mean 'lr'?"),
    ("optimizer=sgd +optimizer.nesterof=true", "optimizer.nesterof=true: unknown key for torch.optim.SGD; "
                                               "did you mean 'nesterov'?"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0]: must be a list of two values, each a number in [0, 1)"),
    ("optimizer.betas=[-0.1,0.999]", "optimizer.betas=[-0.1, 0.999]: must be a list of two values"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9]: must be a list of two values"),
    ("optimizer.eps=-1e-8", "optimizer.eps=-1e-08: must be a number >= 0"),
    ("optimizer.foreach=yes", "optimizer.foreach='yes': must be true or false or null"),
    ("optimizer=momentum optimizer.momentum=1.0", "optimizer.momentum=1.0: must be a number in [0, 1)"),
    ("optimizer=momentum optimizer.dampening=2", "optimizer.dampening=2: must be a number in [0, 1]"),
    ("optimizer=lookahead optimizer.k=0", "optimizer.k=0: must be an int >= 1"),
    ("optimizer=lookahead optimizer.inner.lr=-1", "optimizer.inner.lr=-1: must be a number > 0"),
    ("optimizer=lookahead +optimizer.inner.lrr=1", "optimizer.inner.lrr=1: unknown key for optim.adamw.adamw; "
                                                   "did you mean 'lr'?"),
    ("optimizer=muon optimizer.ns_steps=0", "optimizer.ns_steps=0: must be an int >= 1"),
    ("optimizer=adalo optimizer.mode=bogus", "optimizer.mode='bogus': Invalid mode"),
    ("optimizer._target_=torch.optim.Adamx", "optimizer._target_='torch.optim.Adamx': cannot be imported "
                                             "(module 'torch.optim' has no 'Adamx'); did you mean 'Adamax'?"),
    # regularize
    ("regularize.dropout=1.0", "regularize.dropout=1.0: must be a number in [0, 1)"),
    ("regularize.dropout=-0.1", "regularize.dropout=-0.1: must be a number in [0, 1)"),
    ("regularize.label_smoothing=1.5", "regularize.label_smoothing=1.5: must be a number in [0, 1)"),
    ("regularize.weight_decay=-0.1", "regularize.weight_decay=-0.1: must be a number >= 0"),
    ("regularize.weight_decay_mode=l2", "regularize.weight_decay_mode='l2': must be one of coupled, decoupled"),
    ("regularize.loss_reduction=median", "regularize.loss_reduction='median': must be one of mean, soft_median"),
    ("+regularize.dropuot=0.1", "regularize.dropuot=0.1: unknown key in regularize; did you mean 'dropout'?"),
    ("task=mnist_cnn regularize=augment_digits regularize.augment.erase_p=2",
     "regularize.augment.erase_p=2: must be a number in [0, 1]"),
    # early stopping, monitor
    ("early_stop=on early_stop.patience=-1", "early_stop.patience=-1: must be an int >= 0"),
    ("early_stop=on early_stop.mode=up", "early_stop.mode='up': must be one of min, max"),
    ("early_stop=on trainer.eval_interval=0", "trainer.eval_interval=0: early stopping needs evaluations"),
    ("early_stop=on +early_stop.patiense=2", "early_stop.patiense=2: unknown key for trainer.early_stop."
                                             "EarlyStopping; did you mean 'patience'?"),
    ("monitor.mode=maximum", "monitor.mode='maximum': must be one of min, max"),
    # schedule
    ("schedule.warmup=5000 trainer.max_steps=100", "schedule.warmup=5000 is 5000 steps, longer than the run "
                                                   "(100 steps)"),
    ("schedule.warmup=20ep", "schedule.warmup='20ep' is 8580 steps, longer than the run (4290 steps)"),
    ("task=mnist_cnn schedule.warmup=11ep", "longer than the run (4290 steps)"),  # (60000 - 5000) // 128 * 10
    ("schedule.warmup=1.5", "schedule.warmup=1.5: must be a duration"),
    ("schedule.warmup=-3", "schedule.warmup=-3: must be a duration"),
    ("schedule.floor=2", "schedule.floor=2: must be a number in [0, 1]"),
    ("schedule=wsd schedule.shape=square", "schedule.shape='square': must be one of linear, cosine, 1-sqrt"),
    ("schedule=wsd schedule.warmup=0.5 schedule.cooldown=0.6", "are longer than the run (4290 steps)"),
    ("schedule=plateau schedule.patience=-2", "schedule.patience=-2: must be an int >= 0"),
    ("schedule=plateau trainer.eval_interval=0", "trainer.eval_interval=0: schedule=plateau needs evaluations"),
    ("+schedule.warmpu=0.1", "schedule.warmpu=0.1: unknown key for schedules.cosine_warmup; did you mean 'warmup'?"),
    # trainer
    ("trainer.max_steps=0", "trainer.max_steps=0: must be null or an int >= 1"),
    ("trainer.max_steps=1.5", "trainer.max_steps=1.5: must be null or an int >= 1"),
    ("trainer.max_epochs=null", "set one of them"),
    ("trainer.grad_accum=0", "trainer.grad_accum=0: must be an int >= 1"),
    ("trainer.grad_accum=3", "trainer.grad_accum=3: must divide task.batch_size=128"),
    ("trainer.device=gpu", "trainer.device='gpu': must be auto, cpu, cuda, cuda:N or mps"),
    ("trainer.device=cuda:7", "trainer.device='cuda:7': "),
    ("amp=fp16 trainer.device=cpu", "amp=fp16 with trainer.device=cpu: fp16 autocast + GradScaler need a GPU"),
    ("trainer.nonfinite=ignore", "trainer.nonfinite='ignore': must be one of raise, skip"),
    ("trainer.strategy=fsdp", "trainer.strategy='fsdp': must be one of single, ddp"),
    ("trainer.progress=fancy", "trainer.progress='fancy': must be one of auto, rich, plain, off"),
    ("+trainer.devise=cpu", "trainer.devise='cpu': unknown key in trainer; did you mean 'device'?"),
    ("trainer.log_interval=0", "trainer.log_interval=0: must be a positive duration"),
    ("trainer.eval_interval=abc", "trainer.eval_interval='abc': must be a duration"),
    ("trainer.seed=-1", "trainer.seed=-1: must be an int >= 0"),
    ("trainer.compile=maybe", "trainer.compile='maybe': must be true or false"),
    ("trainer.dry_run=1", "trainer.dry_run=1: must be true or false"),
    # task, norm, clip, amp, data, top level
    ("task.batch_size=0", "task.batch_size=0: must be an int >= 1"),
    ("task.batch_size=100000", "task.batch_size=100000: must be <= the training set (55000 samples)"),
    ("task=mnist_cnn task.val_size=60000", "task.val_size=60000: must be an int in [0, 59999]"),
    ("task=char_transformer task.n_embd=130", "task.n_embd=130: must be a multiple of task.n_head=4"),
    ("task=char_transformer +task.n_layers=2", "task.n_layers=2: unknown key for tasks.char_transformer."
                                               "CharTransformer; did you mean 'n_layer'?"),
    ("norm=layernorm norm.kind=groupnorm", "norm.kind='groupnorm': must be one of none, batchnorm, layernorm, rmsnorm"),
    ("norm=layernorm norm.eps=0", "norm.eps=0: must be a number > 0"),
    ("clip=norm clip.norm.max_norm=0", "clip.norm.max_norm=0: must be a number > 0"),
    ("clip=value +clip.value.vlaue=3", "clip.value.vlaue=3: unknown key for optim.transforms.ClipValue; "
                                      "did you mean 'value'?"),
    ("clip=adaptive clip.adaptive.warmup=500", "clip.adaptive.warmup=500 must be an integer in [1, window=100]"),
    ("amp.dtype=float8", "amp.dtype='float8': must be one of float32, bfloat16, float16"),
    ("data.download=maybe", "data.download='maybe': must be auto, true or false"),
    ("+foo=1", "foo=1: unknown top-level key"),
]


@pytest.mark.parametrize(("line", "expected"), BAD, ids=[line for line, _ in BAD])
def test_bad_command_line_gets_its_message(make, line, expected):
    with pytest.raises(ConfigError) as info:
        validate(make(*line.split()))
    message = str(info.value)
    assert expected in message, message
    assert info.value.exit_code == 2
    assert "could not be checked" not in message


def test_the_table_is_big_enough():
    assert len(BAD) >= 40


def test_every_error_at_once_one_line_each(make):
    lines = problems(make("optimizer.lr=-1", "regularize.dropout=2", "+trainer.devise=cpu", "early_stop=on",
                          "early_stop.patience=-1", "trainer.grad_accum=0", "+optimizer.lrr=3"))
    assert len(lines) == 6, lines
    assert sorted(x.split("=")[0] for x in lines) == ["early_stop.patience", "optimizer.lr", "optimizer.lrr",
                                                      "regularize.dropout", "trainer.devise", "trainer.grad_accum"]


# Hydra rejects these before validation: exit code 1, Hydra's message (no did-you-mean for struct keys).
HYDRA_LEVEL = [
    ("trainer.devise=cpu", "Could not override 'trainer.devise'"),  # not in the config: `+trainer.devise` reaches us
    ("optimizer=adamx", "Could not find 'optimizer/adamx'"),  # and lists the options
    ("optimizer.lr=[", "no viable alternative at input '['"),
]


@pytest.mark.parametrize(("line", "expected"), HYDRA_LEVEL, ids=[line for line, _ in HYDRA_LEVEL])
def test_hydra_rejects_before_validation(make, line, expected):
    with pytest.raises(HydraException, match=re.escape(expected)):
        make(*line.split())


# --- no false positives -----------------------------------------------------------------------------------


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_is_valid(make, group):
    for option in _options(group):
        if (group, option) == ("amp", "fp16"):  # needs a GPU: valid exactly when this machine has one
            continue
        assert problems(make(f"{group}={option}")) == [], f"{group}={option}"


@pytest.mark.parametrize("task", ["mnist_cnn", "char_transformer"])
def test_options_that_depend_on_the_task_are_valid(make, task):
    augment = "augment_digits" if task == "mnist_cnn" else "augment_text"
    for line in [f"regularize={augment}", "schedule=plateau", "schedule=sgdr", "schedule=wsd", "schedule=step",
                 "schedule=multistep", "schedule=exponential", "optimizer=lookahead", "optimizer=muon",
                 "early_stop=on", "norm=rmsnorm trainer.max_steps=10"]:
        assert problems(make(f"task={task}", *line.split())) == [], line


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_is_valid(make, recipe):
    assert problems(make(f"recipe={recipe}")) == []


def test_valid_edge_values(make):
    for line in ["optimizer.betas=[0.0,0.999]", "regularize.dropout=0.99", "schedule.warmup=2ep",
                 "schedule.warmup=4680 trainer.max_steps=4680", "trainer.eval_interval=0", "trainer.max_steps=1",
                 "trainer.device=cpu", "amp=bf16 trainer.device=cpu", "optimizer=adafactor", "trainer.grad_accum=4",
                 "early_stop=on", "trainer.max_epochs=null trainer.max_steps=7", "schedule.warmup=0.5ep",
                 "trainer.compile=true"]:
        assert problems(make(*line.split())) == [], line


# --- property: random bad overrides always end as a ConfigError -------------------------------------------

_letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
_word = _letters.filter(lambda s: s not in {"true", "false", "null", "nan", "inf", "e"})


def _num(x: float) -> str:
    return repr(float(x))


BAD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "optimizer.lr": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(_num), _word),
    "optimizer.betas": st.tuples(st.floats(0, 0.99), st.floats(1.0, 50) | st.floats(-50, -0.01)).map(
        lambda b: f"[{b[0]!r},{b[1]!r}]"),
    "optimizer.eps": st.floats(max_value=-1e-12, min_value=-1e3).map(_num),
    "regularize.dropout": st.one_of(st.floats(1.0, 1e6), st.floats(-1e6, -1e-9)).map(_num),
    "regularize.weight_decay": st.one_of(st.floats(-1e6, -1e-9).map(_num), _word),
    "trainer.max_steps": st.one_of(st.integers(-10**6, 0).map(str), st.floats(1.1, 1e4).map(_num), _word),
    "trainer.grad_accum": st.one_of(st.integers(-100, 0).map(str), _word),
    "trainer.device": _word.filter(lambda s: s not in {"auto", "cpu", "cuda", "mps"}),
    "trainer.nonfinite": _word.filter(lambda s: s not in {"raise", "skip"}),
    "schedule.floor": st.one_of(st.floats(1.0001, 1e6), st.floats(-1e6, -1e-9)).map(_num),
    "schedule.warmup": st.one_of(st.integers(10**6, 10**9).map(str), st.floats(1.01, 1e3).map(_num),
                                 st.integers(-10**6, -1).map(str)),
    "task.batch_size": st.one_of(st.integers(-100, 0).map(str), _word),
    "early_stop.patience": st.one_of(st.integers(-100, -1).map(str), _word),
}


@st.composite
def bad_command_lines(draw: st.DrawFn) -> tuple[list[str], set[str]]:
    """A base choice of options plus 1-3 bad overrides; returns (overrides, keys that must be reported)."""
    base = [draw(st.sampled_from(["optimizer=adamw", "optimizer=adam", "optimizer=sgd", "optimizer=nadam"])),
            draw(st.sampled_from(["schedule=cosine_warmup", "schedule=cosine", "schedule=wsd"])),
            "early_stop=on"]
    keys = draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), min_size=1, max_size=3, unique=True))
    if "optimizer=sgd" in base:  # SGD has no betas/eps
        keys = [k for k in keys if k not in ("optimizer.betas", "optimizer.eps")] or ["optimizer.lr"]
    overrides = [f"{k}={draw(BAD_VALUES[k])}" for k in keys]
    expected = set(keys)
    if {"task.batch_size", "trainer.max_steps"} & expected:
        expected.discard("schedule.warmup")  # a too-long warmup is only known when the run's length is
    if draw(st.booleans()):  # an unknown key too (never a real parameter name)
        group = draw(st.sampled_from(["optimizer", "schedule", "trainer", "regularize", "early_stop"]))
        name = "x_" + draw(_letters)
        overrides.append(f"+{group}.{name}=1")
        expected.add(f"{group}.{name}")
    return base + overrides, expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_command_lines())
def test_random_bad_overrides_always_give_a_config_error(make, case):
    overrides, keys = case
    try:
        validate(make(*overrides))
    except ConfigError as e:
        message = str(e)
    else:
        raise AssertionError(f"no error for {overrides}")
    assert "could not be checked" not in message, message
    for key in keys:
        # a bad batch size may be reported through grad_accum (which must divide it)
        assert key in message or (key == "task.batch_size" and "trainer.grad_accum" in message), (key, message)


# --- the real command line ---------------------------------------------------------------------------------


def test_cli_reports_every_problem_with_exit_code_2(tmp_path: Path):
    out = run_cli("optimizer.lr=-1", "+optimizer.lrr=3", "regularize.dropout=2", "trainer.max_steps=0",
                  f"hydra.run.dir={tmp_path}", "data.root=/nonexistent")  # never reaches the data
    assert out.returncode == 2, out.stderr
    for line in ["optimizer.lr=-1: must be a number > 0", "did you mean 'lr'?", "regularize.dropout=2",
                 "trainer.max_steps=0"]:
        assert line in out.stderr
    assert "4 problems" in out.stderr and "Traceback" not in out.stderr


def test_cli_shows_the_traceback_only_when_asked(tmp_path: Path):
    out = run_cli("trainer.grad_accum=3", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr
    assert "trainer.grad_accum=3: must divide task.batch_size=128" in out.stderr


def test_cli_unknown_key_is_ours_not_hydras(tmp_path: Path):
    """trainer/cli_check.py reports keys missing from the config before Hydra's struct error (exit 2, not 1)."""
    out = run_cli("trainer.devise=cpu", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "did you mean 'trainer.device'?" in out.stderr
    assert "+trainer.devise=" in out.stderr and "Traceback" not in out.stderr
