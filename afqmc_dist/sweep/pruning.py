"""Early stopping of hopeless sweep trials: a training run that is one seed of a sweep trial reports every dev
evaluation to the study, and stops when the study's pruner says so.

The sweep worker (worker.py) starts each trial's first seed run with these environment variables (they pass
through `accelerate launch` to every rank); without them a run is not a sweep trial and nothing here is used:

    AFQMC_SWEEP_STORAGE     the study's storage URL (sqlite:///..., postgresql://...)
    AFQMC_SWEEP_STUDY       the study name
    AFQMC_SWEEP_TRIAL_ID    the trial's id in that storage
    AFQMC_SWEEP_METRIC      the dev metric of the objective: accuracy, f1 or loss
    AFQMC_SWEEP_PRUNER      the sweep file's pruner as JSON, e.g. {"type": "median", "n_startup_trials": 2}
                            (a pruner lives in the process that asks it, not in the storage)

In the training loop, on every rank, after each dev evaluation:

    reporter = TrialReporter.from_env(accelerator, cfg)          # once; None outside a sweep
    if reporter and reporter.should_prune(state.step, metrics):
        raise TrainingStopped(reporter.pruned_message(state.step), exit_code=EXIT_PRUNED)

Only the main process imports Optuna and talks to the storage: it reports the metric at the step and asks the
study's pruner; its answer is broadcast, so every rank stops at the same step. Optuna is imported only here and
only in a sweep trial: a plain run never needs it.
"""

from __future__ import annotations

import json
import math
import os

from ..errors import UserError, first_line
from .spec import PRUNERS, make_pruner

STORAGE_ENV, STUDY_ENV, TRIAL_ENV, METRIC_ENV, PRUNER_ENV = (
    "AFQMC_SWEEP_STORAGE", "AFQMC_SWEEP_STUDY", "AFQMC_SWEEP_TRIAL_ID", "AFQMC_SWEEP_METRIC", "AFQMC_SWEEP_PRUNER")
METRICS = ("accuracy", "f1", "loss")


class TrialReporter:
    """Reports a sweep trial's dev evaluations to its Optuna study and relays the pruner's verdict.

    Construct with `from_env` on EVERY rank; call `should_prune` on every rank at every dev evaluation.
    """

    def __init__(self, accelerator, metric: str, trial=None, trial_number: int | None = None):
        self.accelerator = accelerator
        self.metric = metric
        self.trial = trial  # an optuna.trial.Trial on the main process, None elsewhere
        self.trial_number = trial_number
        self.last_value: float | None = None

    @classmethod
    def from_env(cls, accelerator, cfg) -> TrialReporter | None:
        """The reporter of this run's sweep trial, or None when the run is not one (no AFQMC_SWEEP_* variables).

        Raises UserError on every rank if the variables are incomplete or the main process cannot open the
        study (the storage is unreachable, the trial is unknown).
        """
        trial_id = os.environ.get(TRIAL_ENV)
        if not trial_id:
            return None
        metric = os.environ.get(METRIC_ENV, "accuracy")
        storage, study_name = os.environ.get(STORAGE_ENV), os.environ.get(STUDY_ENV)
        problem = pruner = None
        try:
            pruner = json.loads(os.environ.get(PRUNER_ENV, ""))
        except json.JSONDecodeError:
            pass
        if not (storage and study_name and trial_id.isdigit() and metric in METRICS and isinstance(pruner, dict)
                and pruner.get("type") in PRUNERS):
            problem = (f"incomplete sweep trial settings: {STORAGE_ENV}, {STUDY_ENV}, {TRIAL_ENV} (a number), "
                       f"{METRIC_ENV} (one of {', '.join(METRICS)}) and {PRUNER_ENV} (JSON) must all be set")
        trial = number = None
        if problem is None and accelerator.is_main_process:
            try:
                trial, number = _open_trial(storage, study_name, int(trial_id), make_pruner(pruner))
            except Exception as e:  # noqa: BLE001 - a database error can be of many types
                problem = f"cannot open trial {trial_id} of sweep study {study_name!r}: {first_line(e)}"
        from accelerate.utils import broadcast_object_list

        # The main process decides; every rank raises the same error, or none does.
        problem, number = broadcast_object_list([problem, number])
        if problem:
            raise UserError(problem)
        return cls(accelerator, metric, trial, number)

    def should_prune(self, step: int, metrics: dict) -> bool:
        """Report `metrics[metric]` at `step` to the study and return whether the pruner stops the trial here.

        The same answer on every rank (decided by the main process, broadcast). A metric that is not finite is
        not reported (Optuna refuses it) and does not prune. A storage error is said in one line and does not
        stop the run: pruning only saves time, the trial's value comes from its results.
        """
        from accelerate.utils import broadcast_object_list

        decision = False
        if self.accelerator.is_main_process:
            value = metrics.get(self.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.last_value = float(value)
                try:
                    self.trial.report(float(value), step)
                    decision = bool(self.trial.should_prune())
                except Exception as e:  # noqa: BLE001 - e.g. the database went away
                    print(f"sweep trial {self.trial_number}: could not report step {step} to the study "
                          f"({type(e).__name__}: {first_line(e)}); training goes on", flush=True)
        return bool(broadcast_object_list([decision])[0])

    def pruned_message(self, step: int) -> str:
        """The line a pruned run ends with (shown by rank 0)."""
        value = f" (dev {self.metric} {self.last_value:.4f})" if self.last_value is not None else ""
        return (f"sweep trial {self.trial_number} pruned at step {step}{value}: the study's pruner ranks it "
                "below the other trials at this step")


def _open_trial(storage: str, study_name: str, trial_id: int, pruner):
    """(optuna Trial, its number) for `trial_id` of the study, through a storage without heartbeat (the worker
    that started this run keeps the trial's heartbeat)."""
    import optuna

    from .study import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The random sampler: this process samples nothing (the worker did), and it costs nothing to set up.
    study = optuna.load_study(study_name=study_name, pruner=pruner, sampler=optuna.samplers.RandomSampler(),
                              storage=make_storage(storage, heartbeat=None))
    # Trial(study, trial_id) is how Optuna's own integrations resume reporting to a trial made elsewhere.
    trial = optuna.trial.Trial(study, trial_id)
    return trial, trial.number
