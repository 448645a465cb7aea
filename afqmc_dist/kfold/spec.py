"""The k-fold as a sweep: one searched parameter, the fold, which selects each run's files rather than a run option.

A sweep maps its searched parameters straight to run options (sweep/spec.py, `SweepSpec.run_options`). Here the
one parameter is `fold` (a categorical of 0 .. K-1, searched on a grid, one seed, K trials), and the run of fold k
gets fold k's files: it trains on folds/fold-k/train.json, evaluates on folds/fold-k/dev.json, and predicts that
same dev file (`--do_predict --predict_file`) with its best model, which gives the fold's out-of-fold predictions.
Everything else about a run is the sweep's: its folder (trials/NNNN/seed-S), `--resume_from_checkpoint latest`, the
launcher, heartbeats and retries.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sweep.spec import Param, SweepSpec
from .folds import fold_files

FOLD_PARAM = "fold"


@dataclass
class KFoldSpec(SweepSpec):
    """A SweepSpec over the folds of a k-fold; `output_dir` is the k-fold's folder D (its fold files)."""

    output_dir: str = ""

    @staticmethod
    def fold_space(folds: int) -> list[Param]:
        return [Param(FOLD_PARAM, "categorical", choices=tuple(range(folds)))]

    def run_options(self, params: dict, seed: int, output_dir: str) -> dict:
        """The options of fold `params["fold"]`'s run (what its config file holds)."""
        files = fold_files(self.output_dir, params[FOLD_PARAM])
        return self.options_for(files.train, files.dev, seed, output_dir)

    def options_for(self, train_file: str, dev_file: str, seed: int, output_dir: str) -> dict:
        """A fold run's options with these files: the base, trained on `train_file`, evaluated on and predicting
        `dev_file`."""
        files = {"train_file": train_file, "dev_file": dev_file, "do_predict": True, "predict_file": dev_file}
        return super().run_options(files, seed, output_dir)
