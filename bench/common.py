"""What every bench module shares: where things are, small data helpers, and how a measurement fails."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DEFAULT_CACHE = BENCH / ".cache"  # models, data subsets, logs of every child (ignored by git)
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_DATA = REPO / "afqmc_dist" / "sample_data"


class RowFailed(Exception):
    """A row could not be measured; the message is what the table shows."""


def measured(what: str, measure: Callable[[], dict], row: dict) -> dict:
    """`row` updated with `measure()`, logged as `what ...`; if it raises RowFailed, `row` with the message as its
    "error" (the table shows it and the other rows are still measured)."""
    log(f"{what} ...")
    try:
        return {**row, **measure()}
    except RowFailed as e:
        return {**row, "error": str(e)}


def log(message: str) -> None:
    """Progress goes to stderr; stdout holds the tables only."""
    print(message, file=sys.stderr, flush=True)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy_f1(preds: list[int], labels: list[int], positive: int = 1) -> tuple[float, float]:
    """Accuracy, and F1 of the positive class (label "1" on AFQMC)."""
    tp = sum(p == positive and y == positive for p, y in zip(preds, labels))
    fp = sum(p == positive and y != positive for p, y in zip(preds, labels))
    fn = sum(p != positive and y == positive for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return sum(p == y for p, y in zip(preds, labels)) / len(labels), f1


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if allowed and s not in allowed]
    if bad or not items:
        raise SystemExit(f"error: {text!r}: expected a comma-separated list of {', '.join(allowed or ())}")
    return items


def write_output(path: str, obj: dict) -> None:
    """Write the results as JSON, paths relative to the project root (`bench/...`, `../shared/...`), so a committed
    file reads the same on every machine."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    text = text.replace(f'"{REPO}/', '"').replace(f'"{REPO.parent}/', '"../')
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n", encoding="utf-8")
    log(f"wrote {path}")
