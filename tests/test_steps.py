"""One optimizer step under every engine: a GradScaler decides about overflowing fp16 steps itself; without one,
--skip_nonfinite_loss skips a non-finite update; gradient norms come as tensors, Python floats (DeepSpeed) or None.

The fp16 scaler runs here with a real torch GradScaler on the CPU, handed to accelerate's own optimizer wrapper
(accelerate only builds one itself on a GPU; the GPU case is in test_engines.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from afqmc_dist.training.steps import finite_or_none, is_finite, optimizer_step

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def prepared(accelerator, fused: bool = False):
    """A linear model, AdamW (fused: one kernel, as make_optimizer builds it) and a schedule whose learning rate
    halves at every step it takes, so that the learning rate says how many steps the schedule counted."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    return accelerator.prepare(model, optimizer, scheduler)


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused AdamW", "for-loop AdamW"])
def test_with_a_grad_scaler_overflowing_steps_are_skipped_by_the_scaler_and_reported(fused):
    """Two steps whose gradients overflow, then a normal one. The scaler skips the first two and halves its scale
    each time; the third goes through. Each skip is reported and leaves the learning rate where it was.

    Skipping `optimizer.step()` ourselves left the scaler un-updated: its scale stuck (and on a GPU the next
    `unscale_` raised "unscale_() has already been called"). With the fused AdamW that make_optimizer builds, the
    scaler calls the optimizer's step even on an overflow (the kernel skips the update itself), so accelerate's
    `step_was_skipped` read False: the skip went unreported and the schedule advanced past an update that never
    happened."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model, optimizer, scheduler = prepared(accelerator, fused)
    start, outcomes, scales, rates = weights(model), [], [], []

    for factor in (math.inf, math.inf, 1.0):
        accelerator.backward(model(torch.ones(1, 3)).sum() * factor)
        outcomes.append(optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0,
                                       skip_nonfinite=True).skipped)
        scales.append(accelerator.scaler.get_scale())
        rates.append(scheduler.get_last_lr()[0])
        if factor != 1.0:
            assert all(torch.equal(a, b) for a, b in zip(start, weights(model))), "a skipped step changed nothing"

    assert outcomes == [True, True, False]
    assert scales == [2.0**15, 2.0**14, 2.0**14]
    assert rates == [0.1, 0.1, 0.05], "only the step that updated moved the schedule"
    assert not all(torch.equal(a, b) for a, b in zip(start, weights(model))), "the third step updated the weights"


def test_without_a_scaler_skip_nonfinite_skips_exactly_the_non_finite_update():
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = prepared(accelerator)
    start = weights(model)

    accelerator.backward(model(torch.ones(1, 3)).sum() * math.inf)
    first = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0, skip_nonfinite=True)
    unchanged = all(torch.equal(a, b) for a, b in zip(start, weights(model)))
    rate_after_first = scheduler.get_last_lr()[0]
    accelerator.backward(model(torch.ones(1, 3)).sum())
    second = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0, skip_nonfinite=True)

    assert first.skipped and not is_finite(first.grad_norm) and unchanged
    assert rate_after_first == 0.1, "a skipped update leaves the schedule where it was"
    assert not second.skipped and is_finite(second.grad_norm)
    assert not all(torch.equal(a, b) for a, b in zip(start, weights(model)))


@pytest.mark.parametrize(("norm", "finite", "logged"), [
    (torch.tensor(2.5), True, 2.5), (torch.tensor(math.inf), False, None), (torch.tensor(math.nan), False, None),
    (2.5, True, 2.5), (math.inf, False, None),  # DeepSpeed's get_global_grad_norm: a Python float
    (None, True, None),  # DeepSpeed before its first step
])
def test_every_kind_of_gradient_norm_is_judged_and_never_logged_when_not_finite(norm, finite, logged):
    assert is_finite(norm) is finite
    assert finite_or_none(norm) == logged
