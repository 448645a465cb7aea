"""The training loss: the mean over exactly the pairs of the global batch, however they are spread over processes
and accumulation steps (sampling.py draws the global batches)."""

from __future__ import annotations

import torch
from torch import nn


def pair_loss(model, batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch; return (the loss to backpropagate, the summed cross-entropy of its real pairs).

    `batch` holds the model inputs, `labels` and `weight` (0 for padding copies). The loss is
    sum(weight x cross-entropy) x `scale`, with scale = processes x accumulation / real pairs of the global
    batch: accelerate divides it by the accumulation steps and DDP (or FSDP, DeepSpeed) averages gradients over
    the processes, so the step's gradient is the mean over exactly the global batch's pairs.
    """
    weight, labels = batch.pop("weight"), batch.pop("labels")
    logits = model(**batch).logits.float()  # [B, num_labels]
    summed = (nn.functional.cross_entropy(logits, labels, reduction="none") * weight).sum()
    return summed * scale, summed.detach()
