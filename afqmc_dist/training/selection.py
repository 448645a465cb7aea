"""Which evaluation is the best so far, and whether a new one is enough of an improvement (early stopping).

--metric_for_best_model picks the dev metric: accuracy (the tutorial's choice, the default), f1 (of the positive
label with two labels, macro-F1 with more: on AFQMC, 69% of pairs are "0", so accuracy rewards the majority
guess) or loss (lower is better). Every rank holds the same gathered metrics, so every rank decides the same.
"""

from __future__ import annotations


class BestModelPolicy:
    def __init__(self, metric: str, threshold: float = 0.0):
        self.metric, self.threshold = metric, threshold
        self.sign = -1.0 if metric == "loss" else 1.0  # compare "higher is better" scores

    def gain(self, metrics: dict, best: dict | None) -> float:
        """How much better `metrics` is than the `best` record (inf when there is none yet)."""
        if best is None:
            return float("inf")
        return self.sign * (metrics[self.metric] - best[f"dev_{self.metric}"])

    def is_best(self, metrics: dict, best: dict | None) -> bool:
        return self.gain(metrics, best) > 0

    def improved(self, metrics: dict, best: dict | None) -> bool:
        """Enough of a gain to reset early stopping's patience."""
        return self.gain(metrics, best) > self.threshold


def best_record(metrics: dict, step: int, epoch: int) -> dict:
    """results.json's record of an evaluation: where it happened and its dev metrics, counts included."""
    record = {"best_epoch": epoch, "best_step": step}
    for name in ("accuracy", "f1", "precision", "recall", "loss", "correct", "count"):
        record[f"dev_{name}"] = metrics[name]
    if len(metrics["per_class"]) > 2:
        record["dev_per_class"] = metrics["per_class"]
    return record
