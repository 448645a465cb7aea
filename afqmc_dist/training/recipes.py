"""The training recipes of a run, set up together: the loss (class weights, label smoothing, R-Drop: loss.py),
adversarial training (FGM: adversarial.py) and the weight average (EMA: ema.py). All are off by default, and then
a run computes exactly what it did without them.

The Trainer asks this object for the micro-batch's loss (`objective`), calls `after_backward` (FGM's extra pass)
and `after_update` (the average), and evaluates `evaluated_model` (the average when there is one).
"""

from __future__ import annotations

import time

import torch
from accelerate.utils import DistributedType

from ..errors import UserError
from .adversarial import FGM
from .ema import WeightAverage
from .loss import Objective

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


class Recipes:
    """What --class_weights, --label_smoothing, --rdrop_alpha, --adversarial and --ema_decay add to training.
    Create it after `accelerator.prepare(model, ...)` and before a checkpoint is loaded (the average is saved in
    checkpoints). A sharded engine that cannot run them was refused before (`check_engine`, from
    engine.make_accelerator)."""

    def __init__(self, cfg, accelerator, model, class_weights: list[float] | None):
        self.cfg, self.accelerator = cfg, accelerator
        self.objective = Objective.of(cfg, class_weights, accelerator.device)
        self.fgm = FGM(accelerator, model, cfg.adversarial_epsilon) if cfg.adversarial == "fgm" else None
        self.average = WeightAverage(accelerator, model, cfg.ema_decay) if cfg.ema_decay else None
        self.fgm_timer = PassTimer(accelerator.device)

    def after_backward(self, model, batch: dict, scale: float) -> None:
        """Within the micro-batch's `accumulate` block, after its backward: FGM's adversarial pass."""
        if self.fgm is not None:
            with self.fgm_timer:
                self.fgm.attack(lambda: self.objective(model, batch, scale)[0])

    def after_update(self, model) -> None:
        """After an optimizer step that changed the weights: the average takes them in."""
        if self.average is not None:
            self.average.update(model)

    def evaluated_model(self, model):
        """The model to evaluate and to save as best/: the average, or the model itself."""
        return self.average.module if self.average is not None else model

    def describe(self) -> str | None:
        """One line naming the recipes in use, or None."""
        cfg, parts = self.cfg, []
        if self.objective.weights is not None:
            parts.append(f"class weights {[round(w, 4) for w in self.objective.weights.tolist()]}")
        if cfg.label_smoothing:
            parts.append(f"label smoothing {cfg.label_smoothing:g}")
        if cfg.rdrop_alpha:
            parts.append(f"R-Drop alpha {cfg.rdrop_alpha:g} (every forward on 2x the pairs)")
        if self.fgm is not None:
            parts.append(f"FGM epsilon {cfg.adversarial_epsilon:g} (+1 forward and backward per micro-batch)")
        if cfg.layerwise_lr_decay:
            parts.append(f"layer-wise LR decay {cfg.layerwise_lr_decay:g}")
        if self.average is not None:
            parts.append(f"EMA {cfg.ema_decay:g} (evaluation and best/ use the average)")
        return "recipes: " + "; ".join(parts) if parts else None

    def best_note(self) -> dict:
        """What results.json says of the weights in best/."""
        return {"best_weights": "ema", "ema_decay": self.cfg.ema_decay} if self.average is not None else {}

    def summary(self, train_seconds: float) -> dict:
        """The recipes' measured cost for results.json: FGM's share of the training time."""
        if self.fgm is None:
            return {}
        return {"fgm_seconds_fraction": self.fgm_timer.seconds() / max(train_seconds, 1e-9)}


def check_engine(cfg, distributed_type) -> None:
    """UserError for a recipe that a sharded engine cannot run: each process holds a shard of the weights, so
    neither a whole average nor the embeddings' whole gradient exists on any of them."""
    if distributed_type not in SHARDED:
        return
    for flag, used in (("--ema_decay", cfg.ema_decay), ("--adversarial", cfg.adversarial)):
        if used:
            raise UserError(f"{flag} needs the whole model on every process; {distributed_type.value} shards it: "
                            "train with DDP (accelerate_config.yaml) or leave it out")


class PassTimer:
    """Wall time of a part of each step, without a host sync per step: CUDA events on a GPU, read at the end; the
    clock on the CPU (where the work is done when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.total, self.started = 0.0, 0.0

    def __enter__(self):
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.total += time.perf_counter() - self.started

    def seconds(self) -> float:
        for start, end in self.events:
            end.synchronize()
            self.total += start.elapsed_time(end) / 1000
        self.events.clear()
        return self.total
