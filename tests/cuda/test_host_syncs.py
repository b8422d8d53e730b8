"""No host synchronisation per training step: the steps between log intervals of the GPU recipe (bf16,
nonfinite=raise) run under torch.cuda.set_sync_debug_mode("error"); on a CPU, under a guard that makes host reads
(.item(), bool(), float(), ...) raise. A NaN made on the device is still reported, at the next log interval."""

from __future__ import annotations

import pytest
import torch

from tests.cuda.harness import DEVICES, guarded_steps, nan_at, overrides, pick, poison_loss, sync_guard, train
from trainer.nonfinite import NonFiniteError


def sync_args(device: str) -> tuple[list[str], int, int, int]:
    """(overrides, steps, log interval, the step whose loss is made NaN)"""
    steps, log, nan_step = pick(device, (60, 20, 45), (12, 4, 9))
    args = overrides(device, "amp=bf16", "trainer.nonfinite=raise", f"trainer.max_steps={steps}",
                     f"trainer.log_interval={log}")
    return args, steps, log, nan_step


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_sync_between_log_intervals_and_a_nan_is_still_reported(device, tmp_path):
    args, steps, log, nan_step = sync_args(device)
    with sync_guard(device) as set_mode:
        set_mode("error")  # the guard itself catches a host read, or this test would prove nothing
        with pytest.raises(RuntimeError):
            torch.ones(1, device=device).sum().item()
        set_mode("default")

        record: list[int] = []
        tweak, log_rows = guarded_steps(set_mode, log, log, record)
        train(args, tmp_path / "clean", tweak=tweak, log=log_rows)
        assert record == list(range(log, steps))  # every step after the first interval ran guarded

        tweak, log_rows = guarded_steps(set_mode, log, log)
        with pytest.raises(NonFiniteError, match=f"at step {nan_step}"):
            train(args, tmp_path / "nan", tweak=lambda p: nan_at(nan_step + 1)(tweak(p)), log=log_rows)


@pytest.mark.parametrize("device", DEVICES)
def test_a_host_read_in_a_training_step_is_caught(device, tmp_path):
    """What `print(loss.item())` in the loop would do: a host sync in every step."""
    args, steps, log, _ = sync_args(device)
    reads = poison_loss(set(range(1, 10 * steps)), lambda out: out if float(out.detach().mean()) else out)
    with sync_guard(device) as set_mode:
        tweak, log_rows = guarded_steps(set_mode, log, log)
        match = "host read Tensor.__float__" if device == "cpu" else "synchroniz"
        with pytest.raises(RuntimeError, match=match):
            train(args, tmp_path / "reads", tweak=lambda p: reads(tweak(p)), log=log_rows)
    assert float(torch.ones(())) == 1.0  # the guard is gone afterwards


@pytest.mark.parametrize("average", [["average=ema"], ["average=swa", "average.start=0", "average.every=1"],
                                     ["average=lawa", "average.every=1"]], ids=["ema", "swa", "lawa"])
@pytest.mark.parametrize("device", DEVICES)
def test_weight_averaging_adds_no_host_sync_to_a_step(device, average, tmp_path):
    """Every step updates the average (optim/averaging.py): still no host synchronisation between log intervals."""
    args, steps, log, _ = sync_args(device)
    with sync_guard(device) as set_mode:
        record: list[int] = []
        tweak, log_rows = guarded_steps(set_mode, log, log, record)
        train([*args, *average], tmp_path, tweak=tweak, log=log_rows)
        assert record == list(range(log, steps))
