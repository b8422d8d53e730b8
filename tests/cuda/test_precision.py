"""Precision and kernels of the GPU recipe: bf16 autocast, fp16 with a GradScaler, TF32, fused AdamW, torch.compile.
Each runs on the CPU too where that means something (fp16 there: torch.amp.GradScaler("cpu") set by hand)."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from hydra.utils import instantiate

from optim.param_groups import config_param_groups
from tests.conftest import compose_cfg
from tests.cuda.harness import DEVICES, fp16, max_rel_diff, overflow_at, overrides, pick, train
from trainer.build import build
from trainer.nonfinite import NonFiniteError

BF16_TOL = 1e-2  # bf16 keeps 8 significant bits (relative rounding 2^-9): mean losses follow float32's closely


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_follows_float32_and_a_linear_computes_in_bf16(device, tmp_path):
    common = ("trainer.compile=false", "regularize.dropout=0", "trainer.tf32=false")
    fp32 = train(overrides(device, *common, "amp=off"), tmp_path / "fp32").log.series("train/loss")
    run = train(overrides(device, *common, "amp=bf16"), tmp_path / "bf16")
    bf16 = run.log.series("train/loss")
    p = run.trainer.p
    seen: list[torch.dtype] = []
    linear = next(m for m in p.model.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad(), p.autocast:
        p.task.loss(p.model, p.task.train_batch(p.sampler.indices(0)))
    hook.remove()
    assert seen[0] == torch.bfloat16
    first, last = min(bf16), max(bf16)
    assert bf16[last] < bf16[first], "the bf16 run did not learn"
    assert max_rel_diff(fp32, bf16) <= BF16_TOL


FP16_INIT_SCALE = 2.0**12  # low enough that this model's gradients never overflow by themselves: every skip is ours
FP16_BAD_STEP, FP16_OVERFLOWS = 4, 3


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_overflows_are_redone_then_bounded_by_fp16_max_retries(device, tmp_path):
    """Three forced overflows at step 4 are skipped and redone: the step counter and the schedule do not advance
    (the learning rates logged are the clean run's), the loss scale halves per attempt. Past
    trainer.fp16_max_retries=2 the batch is given up as non-finite (fatal with trainer.max_nonfinite=1)."""
    steps = pick(device, 20, 12)
    amp = "amp=fp16" if device == "cuda" else "amp=off"  # CPU: fp16 autocast and GradScaler("cpu") are set by hand
    args = overrides(device, "trainer.compile=false", amp, f"trainer.max_steps={steps}", "trainer.log_interval=4")
    first = FP16_BAD_STEP + 1  # the loss computation of step FP16_BAD_STEP (0-based)
    attempts = set(range(first, first + FP16_OVERFLOWS))
    clean = train(args, tmp_path / "clean", tweak=fp16(device, FP16_INIT_SCALE))
    hit = train(args, tmp_path / "overflow", tweak=fp16(device, FP16_INIT_SCALE, overflow_at(attempts)))
    assert clean.final.get("skipped_fp16_overflow", 0) == 0  # the count below is the injected overflows'
    assert hit.final["skipped_fp16_overflow"] == FP16_OVERFLOWS
    assert hit.final["step"] == steps
    assert hit.log.series("train/lr") == clean.log.series("train/lr")  # the schedule did not advance on a redo
    assert clean.log.series("train/loss_scale")[steps] == FP16_INIT_SCALE
    assert hit.log.series("train/loss_scale")[steps] == FP16_INIT_SCALE / 2**FP16_OVERFLOWS  # 4096 -> 512
    assert "skipped_nonfinite" not in hit.final and math.isfinite(hit.final["val_loss"])  # a redo is not non-finite

    bounded = [*args, "trainer.fp16_max_retries=2", "trainer.nonfinite=raise", "trainer.max_nonfinite=1"]
    with pytest.raises(NonFiniteError) as e:  # 3 attempts overflow; 2 redos allowed, then one non-finite step ends it
        train(bounded, tmp_path / "bounded", tweak=fp16(device, FP16_INIT_SCALE, overflow_at(attempts)))
    assert f"step {FP16_BAD_STEP}" in str(e.value) and "3 fp16 attempts" in str(e.value)


FUSED_STEPS, FUSED_RTOL, FUSED_ATOL = 10, 1e-5, 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_equals_foreach_adamw_on_identical_gradients(device):
    cfg = compose_cfg(*overrides(device, "regularize.dropout=0"))
    parts = build(cfg)
    fused = parts.optimizer
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults.get("fused")  # the recipe's optimizer
    twin = copy.deepcopy(parts.model)
    node = copy.deepcopy(cfg.optimizer)
    node.fused, node.foreach = False, True
    foreach = instantiate(node)(config_param_groups(twin, cfg.regularize))
    for a, b in zip(fused.param_groups, foreach.param_groups):  # the schedule is not stepped: both at the base LR
        a["lr"] = b["lr"] = a.get("initial_lr", a["lr"])
        assert len(a["params"]) == len(b["params"])
        assert {k for k in a.keys() | b.keys() if k not in ("params", "fused", "foreach", "initial_lr")
                and a.get(k) != b.get(k)} == set()
    start = [q.detach().clone() for q in parts.model.parameters()]
    model, task = parts.model, parts.task
    for step in range(FUSED_STEPS):
        task.loss(model, task.train_batch(parts.sampler.indices(step))).mean().backward()
        for a, b in zip(model.parameters(), twin.parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        fused.step()
        foreach.step()
        fused.zero_grad(set_to_none=True)
        foreach.zero_grad(set_to_none=True)
    moved = max((a - s).abs().max().item() for a, s in zip(model.parameters(), start))
    assert moved > 1e3 * FUSED_ATOL, "the parameters hardly moved: the comparison would mean nothing"
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=FUSED_RTOL, atol=FUSED_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_follows_eager_training(device, tmp_path):
    """float32 both ways; Inductor fuses and reorders reductions: 1e-3 relative on CUDA (the replay's tolerance on
    a GPU), 1e-4 on a CPU. Dropout 0: compiled dropout draws its masks from another random stream than eager's."""
    steps, log = pick(device, (20, 5), (8, 2))
    common = ("amp=off", "trainer.tf32=false", "regularize.dropout=0", f"trainer.max_steps={steps}",
              f"trainer.log_interval={log}")
    eager = train(overrides(device, *common, "trainer.compile=false"), tmp_path / "eager")
    compiled = train(overrides(device, *common, "trainer.compile=true"), tmp_path / "compiled")
    assert hasattr(compiled.trainer.train_model, "_orig_mod"), "trainer.compile=true did not compile the model"
    diff = max_rel_diff(eager.log.series("train/loss"), compiled.log.series("train/loss"))
    assert diff <= pick(device, 1e-3, 1e-4)


def matmul_error(n: int = 4096) -> tuple[float, float]:
    """(relative error against float64, TFLOP/s) of an n x n float32 matmul with the current TF32 setting."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=g)
    b = torch.randn(n, n, device="cuda", generator=g)
    ref = a.double() @ b.double()
    err = ((a @ b).double() - ref).norm().item() / ref.norm().item()
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return err, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


@pytest.mark.cuda
def test_tf32_is_turned_on_by_the_trainer_and_really_used():
    """trainer.tf32=true turns TF32 on; off, a float32 matmul is float32-accurate, on, it is TF32's (> 10x larger:
    the tensor-core kernels were used). TF32 is a CUDA format: no CPU variant."""
    torch.backends.cuda.matmul.allow_tf32 = False
    build(compose_cfg(*overrides("cuda", "trainer.tf32=true")))
    assert torch.backends.cuda.matmul.allow_tf32, "build() with trainer.tf32=true left TF32 off"
    torch.backends.cuda.matmul.allow_tf32 = False
    err_off, tflops_off = matmul_error()
    torch.backends.cuda.matmul.allow_tf32 = True
    err_on, tflops_on = matmul_error()
    print(f"TF32 off/on: rel err {err_off:.1e}/{err_on:.1e}, TFLOP/s {tflops_off:.0f}/{tflops_on:.0f}")
    assert err_off < 1e-5
    assert err_on > 10 * err_off
