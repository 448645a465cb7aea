"""Evaluation and prediction across processes, and the metrics computed from them.

`predict` runs on every rank over a prepared (sharded) DataLoader and returns the predictions for the WHOLE
dataset, in dataset order, on every rank: metrics are then exact whatever the number of processes, and every
rank reaches the same decisions (such as "is this the best model?") from the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class Predictions:
    """Gathered model outputs for a whole dataset, row i = dataset item i.

    probs: `[N, num_labels]` float32 softmax; labels: `[N]` class ids or None (unlabelled input);
    loss: mean cross-entropy over the N examples, or None.
    """

    probs: torch.Tensor
    labels: torch.Tensor | None
    loss: float | None

    @property
    def pred_ids(self) -> torch.Tensor:
        return self.probs.argmax(dim=-1)

    def __len__(self) -> int:
        return self.probs.shape[0]


def predict(model, dataloader, accelerator) -> Predictions:
    """Run `model` over a prepared eval DataLoader; call on EVERY rank (it gathers across processes).

    Leaves the model in eval mode: the training loop switches it back.
    """
    model.eval()
    indices, probs, labels, losses = [], [], [], []
    with torch.no_grad():
        for batch in dataloader:
            index = batch.pop("index")
            batch_labels = batch.pop("labels", None)
            logits = model(**batch).logits.float()
            # gather_for_metrics drops the samples accelerate repeated to even out the last batch across
            # processes, so every example is counted exactly once.
            if batch_labels is None:
                index, logits = accelerator.gather_for_metrics((index, logits))
            else:
                loss = F.cross_entropy(logits, batch_labels, reduction="none")
                index, logits, batch_labels, loss = accelerator.gather_for_metrics(
                    (index, logits, batch_labels, loss))
                labels.append(batch_labels.cpu())
                losses.append(loss.cpu())
            indices.append(index.cpu())
            probs.append(logits.softmax(dim=-1).cpu())

    all_indices = torch.cat(indices)
    order = all_indices.argsort()
    expected = len(dataloader.dataset)
    if not torch.equal(all_indices[order], torch.arange(expected)):
        raise RuntimeError(f"gathered predictions do not cover the {expected} examples exactly once")
    all_labels = torch.cat(labels)[order] if labels else None
    mean_loss = torch.cat(losses).mean().item() if losses else None
    return Predictions(torch.cat(probs)[order], all_labels, mean_loss)


def classification_metrics(pred_ids: torch.Tensor, labels: torch.Tensor, positive_id: int) -> dict:
    """Accuracy, and precision / recall / F1 of the positive class (label "1" on AFQMC), plus the count.

    Accuracy alone flatters a weak model on AFQMC: always answering "0" scores 69%.
    """
    tp = int(((pred_ids == positive_id) & (labels == positive_id)).sum())
    fp = int(((pred_ids == positive_id) & (labels != positive_id)).sum())
    fn = int(((pred_ids != positive_id) & (labels == positive_id)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((pred_ids == labels).float().mean()),
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "count": int(labels.numel()),
    }


def evaluate(model, dataloader, accelerator, positive_id: int) -> dict:
    """Metrics of `model` on a labelled, prepared DataLoader (every rank gets the same dict)."""
    preds = predict(model, dataloader, accelerator)
    return {**classification_metrics(preds.pred_ids, preds.labels, positive_id), "loss": preds.loss}
