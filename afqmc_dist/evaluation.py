"""Evaluation and prediction across processes, and the metrics computed from them.

`predict` runs on every rank over a prepared (sharded) DataLoader and returns the predictions for the WHOLE
dataset, in dataset order, on every rank: metrics are then exact whatever the number of processes, and every
rank reaches the same decisions (such as "is this the best model?") from the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm


@dataclass
class Predictions:
    """Gathered model outputs for a whole dataset, row i = dataset item i.

    probs: `[N, num_labels]` float32 softmax; labels: `[N]` class ids or None (unlabelled input);
    loss: mean cross-entropy over the N examples, or None; seconds: wall time of the pass.
    """

    probs: torch.Tensor
    labels: torch.Tensor | None
    loss: float | None
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return len(self) / self.seconds

    @property
    def pred_ids(self) -> torch.Tensor:
        return self.probs.argmax(dim=-1)

    def __len__(self) -> int:
        return self.probs.shape[0]


def predict(model, dataloader, accelerator, desc: str = "eval") -> Predictions:
    """Run `model` over a prepared eval DataLoader; call on EVERY rank (it gathers across processes).

    The loader may visit the examples in any order (eval loaders go by length, so batches carry little
    padding): the gathered `index` puts every row back in dataset order. Leaves the model in eval mode: the
    training loop switches it back.
    """
    model.eval()
    indices, probs, labels, losses = [], [], [], []
    start = time.perf_counter()
    bar = tqdm(dataloader, desc=desc, unit="batch", leave=False, disable=not accelerator.is_local_main_process)
    with torch.inference_mode():
        for batch in bar:
            index = batch.pop("index")
            batch.pop("weight")  # all 1: accelerate's own padding of the last batch is dropped by the gather
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
    return Predictions(torch.cat(probs)[order], all_labels, mean_loss, time.perf_counter() - start)


def classification_metrics(pred_ids: torch.Tensor, labels: torch.Tensor, positive_id: int,
                           num_labels: int = 2) -> dict:
    """Accuracy, precision / recall / F1 of the positive class (label "1" on AFQMC), the count, and the
    confusion matrix (`[num_labels][num_labels]` counts, rows: true class id, columns: predicted class id).

    Accuracy alone flatters a weak model on AFQMC: always answering "0" scores 69%.
    """
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    confusion.index_put_((labels, pred_ids), torch.ones_like(labels), accumulate=True)
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
        "confusion_matrix": confusion.tolist(),
    }


def evaluate(model, dataloader, accelerator, positive_id: int, desc: str = "eval") -> dict:
    """Metrics of `model` on a labelled, prepared DataLoader (every rank gets the same dict)."""
    preds = predict(model, dataloader, accelerator, desc)
    metrics = classification_metrics(preds.pred_ids, preds.labels, positive_id, preds.probs.shape[1])
    return {**metrics, "loss": preds.loss, "samples_per_second": preds.samples_per_second}
