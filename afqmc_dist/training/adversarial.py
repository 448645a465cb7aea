"""Adversarial training on the word embeddings: FGM (Fast Gradient Method; Miyato et al., 2017, "Adversarial
Training Methods for Semi-Supervised Text Classification"), as the CLUE and AFQMC competition write-ups use it.

After the micro-batch's backward, the word-embedding matrix E is moved along its gradient g,

    r = epsilon x g / ||g||        (r = 0 while g = 0)

the micro-batch goes through the model again with E + r and its loss is backpropagated too (gradients add up),
and E is put back: copied from a copy taken before, so it is bit for bit what it was. The optimizer then steps on
the sum of both gradients. g is E's gradient as it stands: under gradient accumulation it includes the earlier
micro-batches of the step, and on the step's last micro-batch DDP has averaged it over the processes (so every
process moves E the same way).

Cost: one more forward and backward per micro-batch. A sharded engine (FSDP, DeepSpeed) holds a shard of E on each
process, whose gradient is not E's: it is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class FGM:
    """FGM on the word embeddings of the prepared `model`."""

    def __init__(self, accelerator, model, epsilon: float):
        self.accelerator, self.epsilon = accelerator, epsilon
        self.embeddings = accelerator.unwrap_model(model).get_input_embeddings().weight

    def attack(self, loss_of_batch: Callable[[], torch.Tensor]) -> None:
        """After `accelerator.backward(loss)`: the adversarial forward and backward (`loss_of_batch()` computes
        the micro-batch's loss again), E put back exactly."""
        grad = self.embeddings.grad
        if grad is None:
            return
        saved = self.embeddings.detach().clone()
        with torch.no_grad():
            norm = grad.float().norm()
            # No host sync: a zero gradient gives r = 0 (0 / 1), not 0 / 0.
            step = grad * (self.epsilon / torch.where(norm > 0, norm, torch.ones_like(norm))).to(grad.dtype)
            self.embeddings.add_(step)
        try:
            self.accelerator.backward(loss_of_batch())
        finally:
            with torch.no_grad():
                self.embeddings.copy_(saved)
