"""An exponential moving average of the weights (--ema_decay), for evaluation and for best/.

torch's own `AveragedModel` with its EMA update: a copy of the model (on the same device, in fp32) whose weights
after optimizer step t are

    ema_1 = w_1,    ema_t = decay x ema_{t-1} + (1 - decay) x w_t

(w_t: the weights after step t; a skipped update, fp16's overflow, is not a step). The copy is registered with
accelerate for checkpointing, so every checkpoint holds it (with its step count) and a resumed run continues the
same average bit for bit, on any number of processes.

Every process keeps the whole average (after DDP's all-reduce, every process has the same weights, so the same
average). A sharded engine (FSDP, DeepSpeed) holds only a shard of the weights on each process: it is refused.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The EMA of the prepared `model`'s weights. Create it before a checkpoint is loaded (resume)."""

    def __init__(self, accelerator, model, decay: float):
        self.accelerator = accelerator
        self.averaged = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=False)
        accelerator.register_for_checkpointing(self.averaged)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (a plain module: evaluate it, save it)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model) -> None:
        """After an optimizer step that changed the weights."""
        self.averaged.update_parameters(self.accelerator.unwrap_model(model))
