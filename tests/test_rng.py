"""Every generator a run draws from survives a checkpoint and an evaluation: here the MPS generator, which torch
seeds with `torch.manual_seed` like CPU and CUDA. There is no Apple GPU on the test machines, so `torch.mps`'s RNG
functions are replaced by a CPU generator standing in for the MPS one (the functions `torch.random.fork_rng` and
`torch.manual_seed` call are the same ones)."""

from __future__ import annotations

import pytest
import torch

from core.log import NullLogger
from core.rng import rng_state, seed_everything, set_rng_state
from tests.test_loop import line_cfg
from trainer.build import build
from trainer.loop import Trainer


@pytest.fixture
def mps_generator(monkeypatch) -> torch.Generator:
    """The stand-in MPS generator: `torch.backends.mps.is_available()` is true and torch.mps's RNG reads it."""
    import torch._dynamo  # noqa: F401  (imported first: at import it records the real is_available)

    fake = torch.Generator()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": fake.get_state())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": fake.set_state(state.clone()))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: fake.manual_seed(int(seed)))
    return fake


def draws(g: torch.Generator) -> torch.Tensor:
    return torch.rand(8, generator=g)


def test_the_stand_in_is_what_torch_seeds(mps_generator):
    """Guard for the tests below: torch.manual_seed reaches the stand-in, as it reaches the real MPS generator."""
    torch.manual_seed(123)
    assert torch.equal(draws(mps_generator), draws(torch.Generator().manual_seed(123)))


def test_rng_state_saves_and_restores_the_mps_generator(mps_generator):
    seed_everything(0)
    draws(mps_generator)  # somewhere in the stream, not at its seed
    state = rng_state()
    expected = draws(mps_generator)  # what the stream gives from the saved point on
    draws(mps_generator)
    set_rng_state(state)
    assert torch.equal(draws(mps_generator), expected)


def test_rng_state_without_mps_leaves_it_out(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "mps" not in rng_state()
    set_rng_state(rng_state())  # a checkpoint written without MPS loads on a machine without it


def line_trainer(tmp_path) -> Trainer:
    cfg = line_cfg("trainer.device=cpu", "trainer.max_steps=4")
    cfg.early_stop = None
    return Trainer(build(cfg), tmp_path)


def test_a_checkpoint_restores_the_mps_stream(mps_generator, tmp_path):
    trainer = line_trainer(tmp_path)
    state = trainer.state_dict()
    expected = draws(mps_generator)
    trainer.load_state_dict(state)
    assert torch.equal(draws(mps_generator), expected)


def test_evaluation_leaves_the_mps_stream_where_it_was(mps_generator, tmp_path):
    """The evaluation reseeds every generator (torch.manual_seed) for repeatable metrics; afterwards training's MPS
    stream continues exactly where it stopped, as its CPU stream does."""
    trainer = line_trainer(tmp_path)
    draws(mps_generator)
    reference = torch.Generator()
    reference.set_state(mps_generator.get_state())
    cpu_reference = torch.get_rng_state()
    trainer._eval_metrics(trainer.p.task.evaluate)
    trainer._evaluate(NullLogger())
    assert torch.equal(draws(mps_generator), draws(reference))
    assert torch.equal(torch.get_rng_state(), cpu_reference)
