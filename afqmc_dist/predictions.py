"""Prediction files: predictions.jsonl (every input line, in input order, with `pred_label` and `pred_prob`) and,
when every input line has an id, CLUE's submission file TASK_predict.json (`{"id": ..., "label": ...}` lines)."""

from __future__ import annotations

import os

from .files import write_jsonl
from .outputs import PREDICTIONS, clue_file_name, is_clue_file


def prediction_record(example, pred_id: int, prob: float, label_list) -> dict:
    """One line of predictions.jsonl: the input line's fields, the predicted label and its probability."""
    return {**example.raw, "pred_label": label_list[pred_id], "pred_prob": round(prob, 6)}


def write_predictions(output_dir: str, examples, preds, label_list, id_key: str, task_name: str = "afqmc",
                      predictions_name: str = PREDICTIONS) -> list[str]:
    """Write predictions.jsonl (and TASK_predict.json when every input has `id_key`). Main process only.

    `examples[i]` and row i of `preds` describe input line i; returns the paths written. A CLUE file left in
    the folder by an earlier prediction (of this or another task) is removed once the new files are in place, so
    an old submission never sits beside new predictions.
    """
    pred_ids = preds.pred_ids.tolist()
    pred_probs = preds.probs.max(dim=-1).values.tolist()
    path = os.path.join(output_dir, predictions_name)
    write_jsonl(path, (prediction_record(e, p, prob, label_list)
                       for e, p, prob in zip(examples, pred_ids, pred_probs, strict=True)))
    written = [path]
    clue = None
    if all(id_key in e.raw for e in examples):
        clue = os.path.join(output_dir, clue_file_name(task_name))
        write_jsonl(clue, ({"id": e.raw[id_key], "label": label_list[p]} for e, p in zip(examples, pred_ids)))
        written.append(clue)
    for name in os.listdir(output_dir):
        if is_clue_file(name) and os.path.join(output_dir, name) != clue:
            os.remove(os.path.join(output_dir, name))
    return written
