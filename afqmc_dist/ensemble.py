"""Several trained models predicting as one: their probabilities averaged, pair by pair.

    python -m afqmc_dist.predict --model A/best B/best C/best ...     the models given
    python -m afqmc_dist.predict --model KFOLD_DIR ...                a k-fold folder: its fold models (ensemble.json)
    python -m afqmc_dist.predict --model SWEEP_DIR ...                a sweep folder: its best trial's runs, one per
                                                                      seed (needs Optuna, to read the study)

The members may differ in architecture and tokenizer (each tokenises the pairs its own way); they must share their
labels (the same id2label), or the average would mix classes. The ensemble's prediction is the label of the highest
mean probability, and `pred_prob` that mean.
"""

from __future__ import annotations

import json
import os

from .errors import UserError, first_line
from .kfold.folder import ENSEMBLE_JSON  # {"kind": "kfold", "members": [paths relative to the folder]}


def members(paths: list[str]) -> list[str]:
    """The model folders that `--model PATH ...` stands for, in order (a folder may appear once only)."""
    from .sweep.study import SWEEP_JSON  # the marker of a sweep folder

    folders = []
    for path in paths:
        if os.path.isfile(os.path.join(path, ENSEMBLE_JSON)):
            folders += listed_members(path)
        elif os.path.isfile(os.path.join(path, SWEEP_JSON)):
            folders += best_trial_members(path)
        else:
            folders.append(path)
    seen = set()
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            raise UserError(f"--model {folder} is given twice; an ensemble's members must differ")
        seen.add(real)
    return folders


def listed_members(folder: str) -> list[str]:
    path = os.path.join(folder, ENSEMBLE_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            listed = json.load(f)["members"]
        if not listed or not all(isinstance(member, str) for member in listed):
            raise ValueError("'members' must be a non-empty list of folder names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable ensemble ({first_line(e)})") from None
    return [os.path.join(folder, member) for member in listed]


def best_trial_members(folder: str) -> list[str]:
    """The best/ folder of every seed run of the sweep's best complete trial."""
    try:
        import optuna  # noqa: F401 - the study is read through it
    except ImportError:
        raise UserError(f"--model {folder} is a sweep folder: reading its study needs Optuna (pip install "
                        "optuna); or give the runs' best/ folders") from None
    from .sweep.report import load_sweep_dir
    from .sweep.runs import trial_dir

    best = load_sweep_dir(folder).best
    if best is None:
        raise UserError(f"--model {folder}: the sweep has no complete trial yet")
    return [os.path.join(trial_dir(folder, best.slot), f"seed-{seed}", "best") for seed in best.seed_values]


def shared_labels(models: list, folders: list[str]) -> list[str]:
    """The label list every member was trained with (UserError naming the first that differs)."""
    first = dict(models[0].config.id2label)
    for model, folder in zip(models[1:], folders[1:]):
        if dict(model.config.id2label) != first:
            raise UserError(f"--model {folder} predicts labels {sorted(model.config.id2label.values())}, "
                            f"{folders[0]} {sorted(first.values())}: an ensemble's members must share their labels")
    return [first[i] for i in sorted(first)]
