"""The folds: which dev fold each training pair falls in, and the fold files every fold's run reads.

The assignment is stratified by label and depends only on (the training file's labels in file order, K, seed):
within each label the pairs are put in a seeded random order and dealt to the folds in turn, each label starting
at the fold where the previous label stopped. So every fold holds its label's count // K pairs of each label, or
one more (the label ratio is kept to within one pair per label), and the folds' sizes differ by at most one.

The random order comes from `random.Random(seed).random()` keys, not from `shuffle`: Python guarantees the sequence
of `random()` for a seed across versions, not that of `shuffle`, and a k-fold resumed under a newer Python must draw
the same folds as the runs it keeps.

Written to D (nothing else writes there):

    folds/fold-K/train.json   the pairs of every other fold, in the training file's order (fold K's training set)
    folds/fold-K/dev.json     fold K's pairs, in the training file's order (its dev set, and what its run predicts)
    folds.json                K, the seed, the training file, and the pairs per fold and label

A fold file already in D must hold exactly what the assignment gives (a rerun rewrites nothing): one that differs
was changed by hand, and the runs kept in D would no longer be those of its folds, so it is refused.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass

from ..errors import UserError
from ..files import atomic_open

FOLDS_DIR, FOLDS_JSON = "folds", "folds.json"


@dataclass(frozen=True)
class FoldFiles:
    train: str
    dev: str


def fold_files(output_dir: str, fold: int) -> FoldFiles:
    """Where fold `fold`'s training and dev files are in the k-fold folder `output_dir`."""
    folder = os.path.join(output_dir, FOLDS_DIR, f"fold-{fold}")
    return FoldFiles(os.path.join(folder, "train.json"), os.path.join(folder, "dev.json"))


def assign_folds(labels: list[int], folds: int, seed: int) -> list[int]:
    """The dev fold of each pair, by its position in the training file (see the module docstring)."""
    rng = random.Random(seed)
    keys = [rng.random() for _ in labels]
    fold_of = [0] * len(labels)
    start = 0
    for label in sorted(set(labels)):
        members = sorted((i for i, value in enumerate(labels) if value == label), key=lambda i: (keys[i], i))
        for j, i in enumerate(members):
            fold_of[i] = (start + j) % folds
        start = (start + len(members)) % folds
    return fold_of


def rarest_label(labels: list[int], label_list: list[str]) -> tuple[str, int]:
    """The label with the fewest pairs in the file (of those it holds), and its count."""
    label, count = min(Counter(labels).items(), key=lambda item: (item[1], item[0]))
    return label_list[label], count


def fold_summary(labels: list[int], fold_of: list[int], folds: int, seed: int, train_file: str,
                 label_list: list[str]) -> dict:
    """What folds.json holds: the pairs per fold and label."""
    per_fold = []
    for k in range(folds):
        dev = Counter(label for label, f in zip(labels, fold_of) if f == k)
        files = fold_files("", k)
        per_fold.append({"fold": k, "dev": sum(dev.values()), "train": len(labels) - sum(dev.values()),
                         "dev_labels": {label_list[i]: dev.get(i, 0) for i in sorted(set(labels))},
                         "train_file": files.train, "dev_file": files.dev})
    return {"folds": folds, "seed": seed, "train_file": train_file, "pairs": len(labels),
            "labels": {label_list[i]: n for i, n in sorted(Counter(labels).items())}, "per_fold": per_fold}


def write_folds(output_dir: str, lines: list[str], fold_of: list[int], summary: dict) -> None:
    """Write each fold's files and folds.json into `output_dir` (see the module docstring); `lines` are the
    training pairs as JSON lines, in file order."""
    for k in range(summary["folds"]):
        files = fold_files(output_dir, k)
        os.makedirs(os.path.dirname(files.train), exist_ok=True)
        _write_once(files.train, "".join(line for line, f in zip(lines, fold_of) if f != k))
        _write_once(files.dev, "".join(line for line, f in zip(lines, fold_of) if f == k))
    _write_once(os.path.join(output_dir, FOLDS_JSON), json.dumps(summary, ensure_ascii=False, indent=2) + "\n")


def _write_once(path: str, text: str) -> None:
    """Write `text` to `path` unless it is there already; UserError if `path` holds something else."""
    try:
        with open(path, encoding="utf-8") as f:
            found = f.read()
    except FileNotFoundError:
        with atomic_open(path) as f:
            f.write(text)
        return
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None
    if found != text:
        raise UserError(f"{path} differs from the fold this k-fold draws (changed by hand?): the runs kept in its "
                        "folder may not be those of its folds; use a new --output_dir")


def fold_lines(examples) -> list[str]:
    """The training pairs as the fold files hold them: each line's JSON object, one per line."""
    return [json.dumps(example.raw, ensure_ascii=False) + "\n" for example in examples]

