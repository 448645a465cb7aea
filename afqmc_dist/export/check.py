"""The check: the trained and the exported model run on the same pairs, compared, and the export kept or refused.

The pairs are read and checked as the tool reads its data files (pairs.py), tokenised by `encode_pairs` and
padded by the tool's own collator, longest first, so that both models see exactly the inputs prediction gives
them. The exported model is run through `runtime.ExportedClassifier`, the object the predict command will call.

Agreement is measured on probabilities (softmax of the logits, float32, as evaluation.predict computes them):
- fp32: labels identical and every probability within FP32_TOLERANCE of the trained model's, or the export is a
  wrong graph and is refused;
- int8: the accuracy lost on the check file (trained minus exported; without labels, the share of pairs whose
  label changed, the most accuracy it could cost) may not exceed --max_accuracy_drop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data import PairCollator
from ..encoding import encode_pairs
from ..errors import UserError
from ..pairs import PairExample, PairSchema, iter_pairs, read_pairs

FP32_TOLERANCE = 1e-4


@dataclass
class CheckSet:
    """The check file's pairs, tokenised and padded into batches (longest first); `order[k]` is the pair of row k
    of the concatenated batches. `labels` are class ids, or None for a file without labels."""

    path: str
    batches: list[dict[str, torch.Tensor]]
    order: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.order)


def has_labels(path: str, schema: PairSchema) -> bool:
    """Whether the file's first pair carries a label: then every pair must (read_pairs says which does not)."""
    first = next(iter_pairs(path, schema, require_label=False), None)
    return first is not None and schema.label_key in first.raw


def read_check_set(path: str, schema: PairSchema, tokenizer, max_length: int, batch_size: int) -> CheckSet:
    """Read, check and tokenise the check file (FILE:LINE errors as for the training data)."""
    labelled = has_labels(path, schema)
    examples = read_pairs(path, schema, require_label=labelled)
    batches, order = make_batches(tokenizer, examples, max_length, batch_size)
    labels = torch.tensor([e.label for e in examples]) if labelled else None
    return CheckSet(path, batches, order, labels)


def make_batches(tokenizer, examples: list[PairExample], max_length: int, batch_size: int):
    """Padded batches of `examples`, longest first (as the tool's eval loader orders them), and their order."""
    encodings = encode_pairs(tokenizer, examples, max_length)
    order = sorted(range(len(examples)), key=lambda i: -encodings.lengths[i])
    collate = PairCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    batches = []
    for start in range(0, len(order), batch_size):
        items = [{"index": i, "input_ids": encodings[i][0], "token_type_ids": encodings[i][1], "label": None}
                 for i in order[start:start + batch_size]]
        batch = collate(items)
        batches.append({name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids")})
    return batches, torch.tensor(order)


@dataclass
class Run:
    """One model's probabilities on the check set, in file order, and the wall time of the pass."""

    probs: torch.Tensor  # [N, num_labels] float32
    seconds: float

    @property
    def pred_ids(self) -> torch.Tensor:
        return self.probs.argmax(dim=-1)


def run_model(call: Callable[[dict], torch.Tensor], check: CheckSet) -> Run:
    """`call(batch) -> logits` over every batch, timed after one untimed warm-up batch (the shortest)."""
    with torch.inference_mode():
        call(check.batches[-1])
        start = time.perf_counter()
        logits = torch.cat([call(batch).float() for batch in check.batches])
        seconds = time.perf_counter() - start
    probs = torch.empty_like(logits)
    probs[check.order] = logits.softmax(dim=-1)
    return Run(probs, seconds)


def torch_caller(model, names: list[str]) -> Callable[[dict], torch.Tensor]:
    """The trained model called with the inputs its graph takes (segment ids only where it uses them)."""
    model.eval()
    return lambda batch: model(**{name: batch[name] for name in names}).logits


def exported_caller(model) -> Callable[[dict], torch.Tensor]:
    return lambda batch: model(**batch).logits


def compare(trained: Run, exported: Run, check: CheckSet) -> dict:
    """What export_report.json says of the exported model against the trained one on the check set."""
    n = len(check)
    agree = int((trained.pred_ids == exported.pred_ids).sum())
    result = {"file": os.path.abspath(check.path), "pairs": n, "labelled": check.labels is not None,
              "max_prob_diff": float((trained.probs - exported.probs).abs().max()),
              "label_agreement": agree / n, "labels_changed": n - agree,
              "pairs_per_second_trained": n / trained.seconds, "pairs_per_second_exported": n / exported.seconds,
              "speedup": trained.seconds / exported.seconds}
    if check.labels is not None:
        right_trained = int((trained.pred_ids == check.labels).sum())
        right_exported = int((exported.pred_ids == check.labels).sum())
        result.update(accuracy_trained=right_trained / n, accuracy_exported=right_exported / n,
                      accuracy_drop=(right_trained - right_exported) / n)
    return result


def accuracy_loss(result: dict) -> float:
    """The accuracy the export costs on the check set; without labels, the most it could cost (changed labels)."""
    return result["accuracy_drop"] if result["labelled"] else result["labels_changed"] / result["pairs"]


def require_agreement(result: dict, where: str) -> None:
    """An fp32 export computes what the trained model computes: else the graph is wrong, and is refused."""
    if result["labels_changed"] or result["max_prob_diff"] > FP32_TOLERANCE:
        raise UserError(f"{where}: the exported graph does not compute what the trained model does on "
                        f"{result['file']} ({result['labels_changed']} of {result['pairs']} labels differ, "
                        f"probabilities up to {result['max_prob_diff']:.2g} apart, more than {FP32_TOLERANCE:g}); "
                        "nothing written")


def require_accuracy(result: dict, max_drop: float) -> None:
    """The int8 gate: refuse an export that loses more accuracy than --max_accuracy_drop allows."""
    loss = accuracy_loss(result)
    if loss <= max_drop + 1e-12:  # counts divided by the same n: a drop equal to the allowance is allowed
        return
    if result["labelled"]:
        what = (f"accuracy on {result['file']} drops from {result['accuracy_trained']:.4f} to "
                f"{result['accuracy_exported']:.4f} ({loss:.4f})")
    else:
        what = (f"{result['labels_changed']} of {result['pairs']} labels of {result['file']} change ({loss:.4f}; "
                "the file has no labels, so this is the accuracy it may cost)")
    raise UserError(f"--quantize int8: {what}, more than --max_accuracy_drop {max_drop:g} allows; nothing written "
                    "(export without --quantize for fp32, or allow a larger drop)")
