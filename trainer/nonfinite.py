"""The non-finite policy (trainer.nonfinite, max_nonfinite, fp16_max_retries, fp16_min_scale) as one object.

It decides per step whether the optimizer step goes ahead, is skipped or (an fp16 overflow) is redone at the halved
loss scale, counts what it skipped, and raises NonFiniteError. With nonfinite=raise it adds no host sync per step:
the first bad step is recorded on the device and read at the loop's intervals (`check`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from core.errors import UserError
from optim.transforms import global_norm
from trainer.checkpoint import CheckpointDir

STEP, SKIP, REDO = "step", "skip", "redo"  # what becomes of an fp16 step (after_fp16)
ADVICE = "Try a lower optimizer.lr, clip=norm, amp=bf16 instead of fp16, or trainer.nonfinite=skip to skip such steps."


class NonFiniteError(UserError):
    """NaN or Inf in the loss or gradients with trainer.nonfinite=raise (or too many skipped in a row)."""


class NonFinite:
    def __init__(self, t: Any, device: torch.device, dist: Any, fp16: bool, checkpoints: CheckpointDir) -> None:
        self.mode, self.max_in_a_row, self.dist, self.fp16, self.checkpoints = \
            t.nonfinite, t.max_nonfinite, dist, fp16, checkpoints
        # fp16: a batch is redone at most this often, never below this scale (fairseq's min_loss_scale)
        self.fp16_max_retries, self.fp16_min_scale, self.retries = t.fp16_max_retries, t.fp16_min_scale, 0
        self.skipped = {"nonfinite": 0, "nonfinite_in_a_row": 0, "fp16_overflow": 0}
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)  # nonfinite=raise; -1: none
        self.params_checked_at = 0  # the last step at which every parameter was seen finite
        self.stop_reason = ""  # set when nonfinite=skip gave up max_nonfinite steps in a row

    def admit(self, loss: torch.Tensor, params: list[torch.nn.Parameter], step: int) -> bool:
        """Before the optimizer step: False skips it (nonfinite=skip, without fp16: one host sync, like fp16's
        GradScaler, on a non-finite loss or gradient). With raise, a non-finite loss is only recorded."""
        if self.mode == "skip" and not self.fp16:
            finite = torch.isfinite(loss) & torch.isfinite(global_norm(params))
            if not self.dist.agree(bool(finite.item())):
                self.give_up(step, "the loss or the gradient is not finite")
                return False
            self.skipped["nonfinite_in_a_row"] = 0
        if self.mode == "raise":
            bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        return True

    def after_fp16(self, scale: float, new_scale: float, step: int) -> str:
        """After GradScaler.step: STEP (updated), REDO (overflow: the batch again at the lowered scale) or SKIP."""
        if new_scale >= scale:
            self.retries = self.skipped["nonfinite_in_a_row"] = 0
            return STEP
        self.skipped["fp16_overflow"] += 1
        self.retries += 1
        if self.retries <= self.fp16_max_retries and new_scale >= self.fp16_min_scale:
            return REDO
        retries, self.retries = self.retries, 0
        self.give_up(step, f"the gradient stayed non-finite through {retries} fp16 attempts (loss scale down to "
                           f"{new_scale:g}; trainer.fp16_max_retries={self.fp16_max_retries}, "
                           f"trainer.fp16_min_scale={self.fp16_min_scale:g})", fatal=False)
        return SKIP

    def give_up(self, step: int, why: str, fatal: bool = True) -> None:
        """A step given up: counted; max_nonfinite in a row end the run (an error with raise, a stop with skip).
        With raise a `fatal` step is an error at once; an fp16 batch given up is not (calibration skips a few)."""
        if self.mode == "raise" and fatal:
            raise NonFiniteError(f"non-finite step {step}: {why}. {ADVICE}")
        self.skipped["nonfinite"] += 1
        self.skipped["nonfinite_in_a_row"] += 1
        if self.skipped["nonfinite_in_a_row"] >= self.max_in_a_row:
            reason = (f"{self.max_in_a_row} non-finite steps in a row (last at step {step}: {why}); "
                      "lower the learning rate, add clip=norm, or check the data")
            if self.mode == "raise":
                raise NonFiniteError(f"stopped: {reason}.")
            self.stop_reason = reason

    def _last_good(self) -> str:
        last = self.checkpoints.step_files()
        return f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written before it"

    def check(self) -> None:
        """nonfinite=raise: the first non-finite loss since the last check is an error (one host sync)."""
        if self.mode == "raise" and (bad := int(self.first_bad_step.item())) >= 0:
            raise NonFiniteError(f"non-finite training loss at step {bad}; stopped ({self._last_good()}). {ADVICE}")

    def check_params(self, params: list[torch.nn.Parameter], step: int) -> None:
        """Every parameter finite after the update just made (one host sync: before checkpoints and at the end)."""
        if step == self.params_checked_at:
            return
        if not bool(torch.stack([torch.isfinite(q).all() for q in params]).all().item()):
            raise NonFiniteError(
                f"parameters are not finite after step {step} (they were finite at step {self.params_checked_at}): "
                f"an update diverged; stopped without writing a checkpoint ({self._last_good()}). "
                "Try a lower optimizer.lr, clip=norm, or a warmup (schedule=cosine_warmup).")
        self.params_checked_at = step

    def check_final(self, final: dict[str, Any], step: int) -> None:
        """No run ends with a non-finite metric and exit 0: it is an error that says where the trouble began."""
        bad = {k: v for k, v in final.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            k, v = next(iter(bad.items()))
            first = int(self.first_bad_step.item())
            where = (f"the training loss first went non-finite at step {first}" if first >= 0 else
                     f"the training loss and the parameters stayed finite through step {step}")
            raise NonFiniteError(f"final metric {k} is {v} ({', '.join(f'{a}={b}' for a, b in bad.items())}); "
                                 f"{where}. The run is not reported as finished. Try a lower optimizer.lr or "
                                 "clip=norm.")

    def counts(self) -> dict[str, int]:
        """What was skipped, for logs and final_metrics.json (nonzero counts only)."""
        return {k: v for k, v in self.skipped.items() if v and k != "nonfinite_in_a_row"}
