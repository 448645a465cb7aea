"""The training loss: the mean over exactly the pairs of the global batch, however they are spread over processes
and accumulation steps (sampling.py draws the global batches); optionally class-weighted, label-smoothed, and with
R-Drop's consistency term.

Per pair i of label y_i, with logits z_i and p_i = softmax(z_i):

    ce_i     = (1 - s) x -log p_i[y_i] + (s / K) x sum_c -log p_i[c]         (s: --label_smoothing, K labels)
    loss_i   = w[y_i] x ce_i                                                   (w: --class_weights, else 1)
    R-Drop:    the pair goes through the model twice (two dropout masks: z_i, z'_i), and
    loss_i   = (w[y_i] x ce_i + w[y_i] x ce'_i) / 2 + alpha x (KL(p_i || p'_i) + KL(p'_i || p_i)) / 2

and the loss of a global batch of N real pairs is sum_i loss_i / N. Class weights scale each pair's term and do
not renormalise (torch's `weight=` mean divides by the batch's summed weights, a quantity of the batch that
depends on how the pairs are spread over processes): 'auto' weights are N / (K x N_label) over the training
file, so their mean over the file is 1 and the loss keeps its scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..errors import UserError


def class_weights(cfg, label_counts: dict[int, int]) -> list[float] | None:
    """The weight of each label (in --label_list order) for --class_weights: the given numbers, or for 'auto'
    N / (K x N_label) from `label_counts` (the training pairs per class id). UserError for a label without pairs."""
    if cfg.class_weights is None:
        return None
    if cfg.class_weights != "auto":
        return cfg.explicit_class_weights()
    counts = [label_counts.get(label, 0) for label in range(len(cfg.label_list))]
    missing = [name for name, count in zip(cfg.label_list, counts) if count == 0]
    if missing:
        raise UserError(f"--class_weights auto: label {missing[0]!r} has no pair in --train_file {cfg.train_file}; "
                        "give the weights (W0,W1,...) or fix --label_list")
    return [sum(counts) / (len(counts) * count) for count in counts]


@dataclass
class Objective:
    """The loss of a micro-batch (see the module docstring). `weights`: one per label, or None."""

    weights: torch.Tensor | None = None
    label_smoothing: float = 0.0
    rdrop_alpha: float = 0.0

    @classmethod
    def of(cls, cfg, weights: list[float] | None, device: torch.device) -> Objective:
        tensor = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
        return cls(tensor, cfg.label_smoothing, cfg.rdrop_alpha)

    def per_pair(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """w[y] x (label-smoothed) cross-entropy of each pair `[B]`."""
        ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
        return ce * self.weights[labels] if self.weights is not None else ce

    def __call__(self, model, batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one micro-batch; return (the loss to backpropagate, the summed loss of its real pairs).

        `batch` holds the model inputs, `labels` and `weight` (0 for padding copies), and is left as it is (FGM
        runs it again). The loss is sum(weight x loss_i) x `scale`, with scale = processes x accumulation / real
        pairs of the global batch: accelerate divides it by the accumulation steps and DDP (or FSDP, DeepSpeed)
        averages gradients over the processes, so the step's gradient is the mean over exactly the global batch's
        pairs.
        """
        inputs = {k: v for k, v in batch.items() if k not in ("weight", "labels")}
        labels, weight = batch["labels"], batch["weight"]
        if self.rdrop_alpha:
            # One forward over the batch twice: two dropout masks, one kernel launch per layer.
            logits = model(**{k: torch.cat([v, v]) for k, v in inputs.items()}).logits.float()
            first, second = logits.chunk(2)
            per_pair = (self.per_pair(first, labels) + self.per_pair(second, labels)) / 2 \
                + self.rdrop_alpha * symmetric_kl(first, second)
        else:
            per_pair = self.per_pair(model(**inputs).logits.float(), labels)
        summed = (per_pair * weight).sum()
        return summed * scale, summed.detach()


def symmetric_kl(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(KL(p || q) + KL(q || p)) / 2 of each row's two predictions `[B]` (p, q: the softmax of the logits)."""
    log_p, log_q = first.log_softmax(dim=-1), second.log_softmax(dim=-1)
    # kl_div(input=log q, target=log p, log_target) = p x (log p - log q), summed over labels: KL(p || q).
    forward = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
    backward = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(dim=-1)
    return (forward + backward) / 2
