"""Evaluation and prediction across processes, and the metrics computed from them.

`predict` runs on every rank over a prepared (sharded) DataLoader and returns the predictions for the WHOLE
dataset, in dataset order, on every rank: metrics are then exact whatever the number of processes, and every
rank reaches the same decisions (such as "is this the best model?") from the same numbers.
"""

from __future__ import annotations

import contextlib
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


def prepare_for_inference(accelerator, model):
    """A whole (unsharded) model on this process's device, in eval mode, for test/predict.

    Not `accelerator.prepare(model)`: FSDP2 refuses a model without its optimizer, and DeepSpeed cannot size a
    run without a training loader. Inference needs neither sharding nor gradient sync: every process runs the
    whole model on its share of the data (a BERT fits any GPU), `inference_autocast` gives the run's precision,
    and `predict` gathers. The same code on every engine and on the CPU.
    """
    return model.to(accelerator.device).eval()


def inference_autocast(accelerator):
    """Autocast to the run's mixed precision (bf16/fp16), or nothing in fp32. Harmless around a prepared model,
    whose forward accelerate already wraps."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    return torch.autocast(device_type=accelerator.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


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
    with torch.inference_mode(), inference_autocast(accelerator):
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
    mean_loss = torch.cat(losses).double().mean().item() if losses else None
    return Predictions(torch.cat(probs)[order], all_labels, mean_loss, time.perf_counter() - start)


def confusion(pred_ids: torch.Tensor, labels: torch.Tensor, num_labels: int) -> list[list[int]]:
    """Counts of (true class, predicted class): rows true class ids, columns predicted ones."""
    matrix = torch.zeros(num_labels, num_labels, dtype=torch.long)
    matrix.index_put_((labels.long(), pred_ids.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return matrix.tolist()


def classification_metrics(pred_ids: torch.Tensor, labels: torch.Tensor, positive_id: int,
                           label_list: list[str] | None = None, num_labels: int = 2) -> dict:
    """Metrics of predicted class ids against labels (see `metrics_of_counts`)."""
    names = list(label_list) if label_list is not None else [str(i) for i in range(num_labels)]
    return metrics_of_counts(confusion(pred_ids, labels, len(names)), positive_id, names)


def metrics_of_counts(matrix: list[list[int]], positive_id: int, names: list[str]) -> dict:
    """Metrics from integer counts, so that 325 right out of 500 reads 0.65 exactly.

    `correct` and `count`, `accuracy` = correct / count; the confusion matrix (`[num_labels][num_labels]` counts,
    rows: true class id, columns: predicted class id). With two labels, `precision` / `recall` / `f1` are those of
    `positive_id` (label "1" on AFQMC: accuracy alone flatters a weak model there, always answering "0" scores
    69%). With more (OCNLI, CMNLI), `f1` is the macro-F1 and `precision` / `recall` are macro averages; with any
    number, `per_class` holds each label's precision, recall, F1 and support.
    """
    k = len(names)
    correct, count = sum(matrix[i][i] for i in range(k)), sum(map(sum, matrix))
    per_class = {}
    for i, name in enumerate(names):
        tp = matrix[i][i]
        predicted, support = sum(row[i] for row in matrix), sum(matrix[i])
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        per_class[name] = {"precision": precision, "recall": recall, "f1": _ratio(2 * tp, predicted + support),
                           "support": support}
    if k == 2:
        chosen = per_class[names[positive_id]]
        precision, recall, f1 = chosen["precision"], chosen["recall"], chosen["f1"]
    else:
        precision, recall, f1 = (sum(c[m] for c in per_class.values()) / k for m in ("precision", "recall", "f1"))
    return {"accuracy": _ratio(correct, count), "f1": f1, "precision": precision, "recall": recall,
            "correct": correct, "count": count, "confusion_matrix": matrix, "per_class": per_class}


def _ratio(numerator: int, denominator: int) -> float:
    """An exact ratio of two counts (float64 division of integers); 0.0 for an empty denominator."""
    return numerator / denominator if denominator else 0.0


def evaluate(model, dataloader, accelerator, positive_id: int, label_list: list[str] | None = None,
             desc: str = "eval") -> dict:
    """Metrics of `model` on a labelled, prepared DataLoader (every rank gets the same dict)."""
    preds = predict(model, dataloader, accelerator, desc)
    metrics = classification_metrics(preds.pred_ids, preds.labels, positive_id, label_list, preds.probs.shape[1])
    return {**metrics, "loss": preds.loss, "samples_per_second": preds.samples_per_second}


def loggable(metrics: dict) -> dict:
    """What metrics.jsonl and the trackers get of an evaluation: the numbers and the confusion matrix, and with
    more than two labels each label's precision / recall / F1 as `precision/LABEL`, ... (two labels: the positive
    label's are the headline numbers already)."""
    values = {k: v for k, v in metrics.items() if k != "per_class"}
    if len(metrics.get("per_class", {})) > 2:
        for label, scores in metrics["per_class"].items():
            values.update({f"{name}/{label}": scores[name] for name in ("precision", "recall", "f1")})
    return values
