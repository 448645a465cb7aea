"""What a finished k-fold leaves in D: the out-of-fold predictions, cv.md and ensemble.json.

    oof_predictions.jsonl  one line per training pair, in the training file's order: the pair's JSON object with
                           `pred_label` and `pred_prob` (the probability of that label) as the model of its fold
                           predicted it (the fold run's own predictions.jsonl), and `fold`. Every pair is predicted
                           exactly once, by the one model that did not train on it.
    cv.md                  mean and sample standard deviation (n - 1) over the folds of each dev metric of the folds'
                           results.json (the best evaluation of each run), each fold's value, and the accuracy and F1
                           of the out-of-fold predictions over all pairs
    ensemble.json          {"kind": "kfold", "members": [each fold's best/ folder, relative to D, in fold order]}:
                           `python -m afqmc_dist.predict --model D` averages the members' probabilities

Every input is read and checked first (a fold's predictions must be its dev fold's pairs, in order); the files
are then written atomically, under D/.kfold.lock, so that commands finishing at once on several machines do not
write the same file together. They are written again, identically, by every later run of the command.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

from ..errors import UserError, first_line
from ..files import atomic_open, read_jsonl, write_json, write_jsonl
from ..outputs import BEST_DIR, PREDICTIONS, RESULTS
from .folder import CV_MD, ENSEMBLE_JSON, OOF_PREDICTIONS, folder_lock

METRICS = ("accuracy", "f1", "precision", "recall", "loss")  # each fold's dev_METRIC in its results.json
PREDICTED = ("pred_label", "pred_prob")


@dataclass
class Outcome:
    """The out-of-fold metrics over all pairs (evaluation.metrics_of_counts), and each fold's results.json."""

    oof: dict
    results: dict[int, dict]


def write_outputs(kfold, runs: dict[int, str]) -> Outcome:
    """Read every fold's results and predictions, then write the three files into D (see the module docstring)."""
    results = {k: _read_json(os.path.join(runs[k], RESULTS)) for k in range(kfold.folds)}
    predictions = {k: _fold_predictions(kfold, k, runs[k]) for k in range(kfold.folds)}
    position = [0] * kfold.folds
    records = []
    for fold in kfold.fold_of:  # the training file's order
        records.append({**predictions[fold][position[fold]], "fold": fold})
        position[fold] += 1
    oof = _metrics(kfold, records)
    outcome = Outcome(oof, results)
    members = [os.path.relpath(os.path.join(runs[k], BEST_DIR), kfold.output_dir) for k in range(kfold.folds)]
    with folder_lock(kfold.output_dir):
        write_jsonl(os.path.join(kfold.output_dir, OOF_PREDICTIONS), records)
        with atomic_open(os.path.join(kfold.output_dir, CV_MD)) as f:
            f.write(render_cv(kfold, runs, outcome))
        write_json(os.path.join(kfold.output_dir, ENSEMBLE_JSON), {"kind": "kfold", "members": members})
    return outcome


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({first_line(e)})") from None


def _fold_predictions(kfold, fold: int, run: str) -> list[dict]:
    """The fold run's predictions.jsonl, checked to be its dev fold's pairs, in order, each once."""
    path = os.path.join(run, PREDICTIONS)
    pairs = [example.raw for example, f in zip(kfold.examples, kfold.fold_of) if f == fold]
    try:
        lines = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({first_line(e)})") from None
    if len(lines) != len(pairs):
        raise UserError(f"{path}: {len(lines)} predictions for the {len(pairs)} pairs of fold {fold}")
    for number, (line, pair) in enumerate(zip(lines, pairs), start=1):
        if {k: v for k, v in line.items() if k not in PREDICTED} != pair or not all(k in line for k in PREDICTED):
            raise UserError(f"{path}:{number}: not a prediction of fold {fold}'s pair {number}")
    return lines


def _metrics(kfold, records: list[dict]) -> dict:
    """Accuracy, F1 (of the positive label; macro-F1 with 3+ labels), ... of the out-of-fold predictions, from
    counts, as the tool computes a dev evaluation's."""
    from ..evaluation import metrics_of_counts

    index = {label: i for i, label in enumerate(kfold.label_list)}
    matrix = [[0] * len(index) for _ in index]
    for example, record in zip(kfold.examples, records):
        matrix[example.label][index[record["pred_label"]]] += 1
    return metrics_of_counts(matrix, index[kfold.positive_label], kfold.label_list)


def fold_statistics(results: dict[int, dict]) -> dict[str, tuple[float, float, list[float]]]:
    """metric -> (mean, sample standard deviation, each fold's value), over the folds' dev metrics."""
    table = {}
    for metric in METRICS:
        values = [float(results[k][f"dev_{metric}"]) for k in sorted(results) if f"dev_{metric}" in results[k]]
        if len(values) == len(results):
            table[metric] = (statistics.mean(values), statistics.stdev(values), values)
    return table


def render_cv(kfold, runs: dict[int, str], outcome: Outcome) -> str:
    """cv.md: the folds' metrics (mean, std, each fold), the out-of-fold metrics, the folds, the ensemble."""
    folds, oof = kfold.folds, outcome.oof
    intro = (f"{len(kfold.examples)} pairs of `{kfold.train_file}` in {folds} folds stratified by label (seed "
             f"{kfold.seed}); each fold's model was trained on the other {folds - 1} folds, evaluated on its own "
             f"(the best evaluation of its run, from its `results.json`) and predicted it. Config: "
             f"`{kfold.config_path}`.")
    lines = [f"# {folds}-fold cross-validation", "", intro, "",
             "| metric | mean | std | " + " | ".join(f"fold {k}" for k in range(folds)) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in range(folds)) + " |"]
    for metric, (mean, std, values) in fold_statistics(outcome.results).items():
        lines.append(f"| {metric} | {mean:.4f} | {std:.4f} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    f1 = f"label {kfold.positive_label!r}" if len(kfold.label_list) == 2 else "macro"
    oof_line = (f"Every training pair predicted once, by the model of the fold that held it out "
                f"(`{OOF_PREDICTIONS}`): accuracy {oof['accuracy']:.4f} ({oof['correct']} of {oof['count']}), "
                f"F1 {oof['f1']:.4f} ({f1}).")
    lines += ["", "std: the sample standard deviation over the folds (n - 1 in the denominator).", "",
              "## Out-of-fold predictions", "",
              oof_line, "",
              "## The folds", "",
              "| fold | dev pairs | dev pairs by label | best step | run |",
              "| --- | --- | --- | --- | --- |"]
    for k in range(folds):
        labels = [kfold.label_list[e.label] for e, f in zip(kfold.examples, kfold.fold_of) if f == k]
        by_label = ", ".join(f"{label}: {labels.count(label)}" for label in sorted(set(labels)))
        lines.append(f"| {k} | {len(labels)} | {by_label} | {outcome.results[k].get('best_step', '')} | "
                     f"`{os.path.relpath(runs[k], kfold.output_dir)}` |")
    ensemble = (f"`{ENSEMBLE_JSON}` lists the {folds} fold models (each run's `best/`). Predicting with all of "
                "them, their probabilities averaged:")
    lines += ["", "## The ensemble", "", ensemble, "", "```bash",
              f"python -m afqmc_dist.predict --model {kfold.output_dir} --input PAIRS.json --output OUT.jsonl",
              "```", ""]
    return "\n".join(lines)
