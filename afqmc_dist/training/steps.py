"""One optimizer step, the same under every engine: DDP, FSDP2, DeepSpeed, fp32, bf16, fp16 with a GradScaler.

Call `optimizer_step` inside `accelerator.accumulate(model)` after `accelerator.backward(loss)`, on every micro-batch:
accelerate turns the optimizer and scheduler calls into no-ops until the gradients of a whole global batch are in.

Non-finite gradients:
- fp16 with a GradScaler: an overflow (inf/NaN gradients) is NORMAL while the scaler looks for its scale. The
  scaler skips that update and lowers the scale itself, in `optimizer.step()` (which also runs `scaler.update()`).
  So the step is always called: skipping it ourselves would leave the scaler un-updated, and its next `unscale_`
  raises "unscale_() has already been called on this optimizer since the last update()".
  Whether the scaler skipped is read from the scaler itself: its scale falls exactly on an overflow step.
  accelerate's `optimizer.step_was_skipped` cannot tell for a fused optimizer (the AdamW this tool builds): the
  scaler hands a fused optimizer the overflow flag and calls its `step` every time (the kernel then leaves the
  weights alone), so accelerate, which watches for a `step` call that never came, always reads "not skipped".
- without a scaler, `--skip_nonfinite_loss` skips the update when the gradient norm is not finite (one host sync
  per step); otherwise a non-finite loss stops the run (training.py).
A skipped update never advances the learning-rate schedule. The gradient norm is a tensor (DDP, FSDP), a Python
float (DeepSpeed), or None (DeepSpeed before its first step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    grad_norm: torch.Tensor | float | None  # None on accumulation micro-batches
    skipped: bool  # the update of this optimizer step was skipped (non-finite gradients)


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float,
                   skip_nonfinite: bool) -> StepResult:
    """Clip, step, schedule and zero the gradients (on sync micro-batches; no-ops on the others)."""
    grad_norm, skipped = None, False
    scaler = accelerator.scaler if accelerator.sync_gradients else None
    if accelerator.sync_gradients:
        # Under fp16 this unscales the gradients first, so the norm (and the clipping) is the true one.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
        # The norm is all-reduced: every rank takes the same decision.
        skipped = skip_nonfinite and scaler is None and not is_finite(grad_norm)
    if not skipped:
        scale = scaler.get_scale() if scaler is not None else None  # a host sync, as the scaler's own check is
        optimizer.step()
        skipped = scale is not None and scaler.get_scale() < scale
    if not skipped:
        # On accumulation micro-batches accelerate's scheduler only counts (it steps once per optimizer step).
        scheduler.step()
    optimizer.zero_grad()
    return StepResult(grad_norm, skipped)


def is_finite(value: torch.Tensor | float | None) -> bool:
    """True for a finite number, and for None (no norm yet); a tensor is read back (a host sync)."""
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def finite_or_none(value: torch.Tensor | float | None) -> float | None:
    """`value` as a Python float if it is finite, else None (never log Infinity/NaN)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
