"""The end-of-run summary printed on the main process, and the project's git commit for the run's config."""

from __future__ import annotations

import os
import subprocess

from .outputs import BEST_DIR, METRICS


def git_commit() -> str | None:
    """The commit of this project's checkout (with '+dirty' when it has local changes), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def recipe_lines(results: dict) -> list[str]:
    """What the training recipes cost and changed (training/recipes.py)."""
    lines = []
    if "fgm_seconds_fraction" in results:
        lines.append(f"  FGM: its extra forward and backward took {100 * results['fgm_seconds_fraction']:.0f}% of "
                     "the training time")
    if results.get("best_weights") == "ema":
        lines.append(f"  best/ holds the moving average of the weights (EMA, decay {results['ema_decay']:g})")
    return lines


def run_summary(cfg, results: dict, written: list[str], seconds: float) -> str:
    """One screen: the best evaluation, test metrics, throughput, and where every file went."""
    took = f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
    lines = ["", "=" * 72, f"run finished in {took} -> {cfg.output_dir}"]
    if "best_epoch" in results:
        lines.append(f"  best dev: epoch {results['best_epoch']} step {results['best_step']}: accuracy "
                     f"{results['dev_accuracy']:.4f}  f1 {results['dev_f1']:.4f}  precision "
                     f"{results['dev_precision']:.4f}  recall {results['dev_recall']:.4f}")
        lines.append(f"  training: {results['train_runtime']:.0f} s of steps, "
                     f"{results['train_samples_per_second']:.1f} samples/s, "
                     f"{results['train_tokens_per_second']:.0f} tokens/s, "
                     f"{100 * results['train_padding_fraction']:.1f}% padding")
        lines += recipe_lines(results)
        lines.append(f"  model: {os.path.join(cfg.output_dir, BEST_DIR)}   metrics: "
                     f"{os.path.join(cfg.output_dir, METRICS)}")
    if "test_accuracy" in results:
        lines.append(f"  test: accuracy {results['test_accuracy']:.4f}  f1 {results['test_f1']:.4f} "
                     f"({results['test_count']} pairs)")
    lines += [f"  predictions: {path}" for path in written]
    lines.append("=" * 72)
    return "\n".join(lines)
