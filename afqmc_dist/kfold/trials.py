"""The folds as the study's trials: queued once, one per fold, and read back as each fold's finished run.

Why queue them rather than let the grid sampler draw them: Optuna's GridSampler gives trial n the n-th point of a
grid it shuffles with its own seed, and every worker process draws with a seed of its own (sweep/study.py), so two
workers (or a rerun) could give two trials the same fold and none to another. Queued trials carry their fold as a
fixed parameter (`study.enqueue_trial`), which the sampler never changes: trial k is fold k, run in trials/000k,
and a retried trial keeps its fold. They are queued under the sweep folder's lock, by the first command to find
the study without them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from filelock import FileLock

from ..errors import EXIT_INTERNAL, EXIT_NONFINITE, EXIT_STOPPED, EXIT_USER, TrainingStopped, UserError
from ..sweep.ledger import Ledger
from ..sweep.runs import trial_dir
from ..sweep.study import LOCK_FILE
from .spec import FOLD_PARAM


class FoldFailed(RuntimeError):
    """A fold's run failed in a way that is neither bad input nor a NaN loss: an unexpected error (exit status 4)."""


def queue_folds(study, runs_dir: str, folds: int) -> None:
    """Queue a trial for each fold the study has none for (all of them on a new study, none on a rerun; the rest
    after a command killed while it queued them), in fold order."""
    with FileLock(os.path.join(runs_dir, LOCK_FILE)):
        trials = study.get_trials(deepcopy=False)
        present = {t.params.get(FOLD_PARAM, t.system_attrs.get("fixed_params", {}).get(FOLD_PARAM)) for t in trials}
        for fold in range(folds):
            if fold not in present:
                study.enqueue_trial({FOLD_PARAM: fold})


@dataclass
class FoldRuns:
    """The study's folds by state: the run folder of each complete one, the failed ones with their trial slot."""

    complete: dict[int, str]
    failed: dict[int, int]

    def count(self) -> int:
        return len(self.complete)


def fold_runs(study, runs_dir: str, seed: int) -> FoldRuns:
    """Each fold's finished run, from the study's trials (a fold run twice: its first complete run)."""
    ledger = Ledger(study.get_trials(deepcopy=False))
    complete, failed = {}, {}
    for slot in sorted(ledger.slots):
        latest, state = ledger.slots[slot][-1], ledger.state(slot)
        fold = latest.params.get(FOLD_PARAM)
        if state == "complete":
            complete.setdefault(fold, os.path.join(runs_dir, latest.user_attrs["runs"][str(seed)]))
        elif state == "failed":
            failed.setdefault(fold, slot)
    return FoldRuns(complete, {fold: slot for fold, slot in failed.items() if fold not in complete})


def check_all_done(runs: FoldRuns, folds: int, runs_dir: str, seed: int) -> None:
    """Raise unless every fold has a complete run: the first failed fold's own error (its run's exit status
    decides the k-fold's: 2 bad input, 1 a NaN loss, else 4), or a stop (status 3) for folds still unfinished."""
    for fold, slot in sorted(runs.failed.items()):
        run = os.path.join(trial_dir(runs_dir, slot), f"seed-{seed}")
        try:
            with open(f"{run}.json", encoding="utf-8") as f:
                record = json.load(f)
            status, line = int(record["status"]), str(record.get("line") or "no message")
        except (OSError, ValueError, KeyError, TypeError):
            status, line = EXIT_INTERNAL, "no record of how it ended"
        message = (f"fold {fold}'s run failed ({line.removeprefix('error: ')}; log: {run}.log): the k-fold cannot "
                   "be completed in this folder; fix the cause and use a new --output_dir")
        if status == EXIT_USER:
            raise UserError(message)
        if status == EXIT_NONFINITE:
            raise TrainingStopped(message, exit_code=EXIT_NONFINITE)
        raise FoldFailed(f"exit status {status}: {message}")
    missing = [fold for fold in range(folds) if fold not in runs.complete]
    if missing:
        raise TrainingStopped(f"{runs.count()} of {folds} folds are done; fold(s) {', '.join(map(str, missing))} "
                              "are still running elsewhere, or their worker is gone (a fold whose worker stops "
                              "beating is run again once --grace_period has passed): run the same command again "
                              "to finish", exit_code=EXIT_STOPPED)
