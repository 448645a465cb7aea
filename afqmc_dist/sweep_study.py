"""A sweep's study and folder: opening the Optuna storage, checking that a folder and a study belong to the same
sweep, counting trials the way workers share them, and the trackers' sweep-wide settings.

SWEEP_DIR holds:

    sweep.json        {"study_name", "storage"} (the storage URL without its password): marks the folder as a sweep's
    sweep.yaml        a copy of the sweep file of the last run of the command
    study.db          the study (SQLite), unless --storage names another database
    trials/NNNN/      each trial's seed runs (sweep_runs.py)
    mlflow.db, mlruns the MLflow store, with --report_to mlflow (unless MLFLOW_TRACKING_URI is set)
    sweep.md, sweep.png, best_config.yaml   written by `python -m afqmc_dist.report SWEEP_DIR`
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter

from .errors import UserError, first_line
from .sweep_config import SweepSpec

SWEEP_JSON, SWEEP_YAML, STUDY_DB, MLFLOW_DB, MLFLOW_ARTIFACTS = (
    "sweep.json", "sweep.yaml", "study.db", "mlflow.db", "mlruns")
IDENTITY_ATTR, MLFLOW_PARENT_ATTR = "afqmc_sweep", "mlflow_parent_run_id"
# Names a worker in its lines and offsets its sampler's seed: 1..N for --workers N, the array task id under SLURM.
WORKER_ENV = "AFQMC_SWEEP_WORKER"


class Ledger:
    """The study's trials grouped by slot. A slot is one of the study's `n_trials` configurations: one trial, or a
    chain of them when a trial whose worker was lost is queued again (Optuna's RetryHeartbeatStaleTrialCallback
    records the first trial's number in every retry; that number names the slot and its folder).

    A slot's state is its latest trial's: complete, pruned, failed (its run failed: user attribute `error`),
    running, waiting (queued), or lost (failed with no run error and no retry: a worker's bug). Trials dropped
    because another worker took the last slot first (`unneeded`) belong to no slot.
    """

    def __init__(self, trials):
        from optuna.trial import TrialState

        self.by_number = {t.number: t for t in trials}
        self.slots: dict[int, list] = {}
        for trial in sorted(trials, key=lambda t: t.number):
            if "unneeded" not in trial.user_attrs:
                self.slots.setdefault(self.slot_of(trial), []).append(trial)
        self.waiting = [t for t in trials if t.state == TrialState.WAITING]
        self.running = [t for t in trials if t.state == TrialState.RUNNING]

    @staticmethod
    def slot_of(trial) -> int:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an "experimental" notice
            first = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
        return trial.number if first is None else first

    def trial(self, number: int):
        return self.by_number[number]

    def state(self, slot: int) -> str:
        latest = self.slots[slot][-1]
        name = latest.state.name.lower()
        if name == "fail":
            return "failed" if "error" in latest.user_attrs else "lost"
        return name

    def taken(self, before: int | None = None) -> int:
        """Slots that count towards the study's trials (all but lost ones), numbered below `before` if given."""
        return sum(1 for slot in self.slots if (before is None or slot < before) and self.state(slot) != "lost")

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.state(slot) for slot in sorted(self.slots)))

    def finished(self) -> list:
        """The latest trial of every finished slot (complete, pruned, failed), by slot number."""
        return [self.slots[s][-1] for s in sorted(self.slots) if self.state(s) in ("complete", "pruned", "failed")]


def mask_password(url: str) -> str:
    """A storage URL as it may be shown and stored: without its password (give it with PGPASSWORD / ~/.pgpass)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy can read: shown as given, the error comes later
        return url


def make_storage(spec: SweepSpec, url: str, heartbeat: bool = True):
    """The Optuna RDB storage at `url`; with `heartbeat`, the worker's: heartbeats and retries of stale trials."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    kwargs = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": spec.heartbeat_interval, "grace_period": spec.grace_period,
                  "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as e:  # noqa: BLE001 - a missing driver, a refused connection, a bad URL: many types
        raise UserError(f"--storage {mask_password(url)}: cannot open it: {first_line(e)}") from None


def study_names(storage) -> list[str]:
    import optuna

    return optuna.study.get_all_study_names(storage)


def prepare_sweep_dir(spec: SweepSpec, sweep_dir: str, storage_url: str | None) -> str:
    """Check that SWEEP_DIR is a new folder or this study's and create it; return the storage URL.

    Refused: a folder that is neither empty nor a sweep's, a sweep folder of another study or storage, and a
    sweep folder whose study is gone from its storage (its trials/ would be mixed with a new study's).
    """
    url = storage_url or f"sqlite:///{os.path.join(os.path.abspath(sweep_dir), STUDY_DB)}"
    marker = os.path.join(sweep_dir, SWEEP_JSON)
    if os.path.exists(sweep_dir) and not os.path.isdir(sweep_dir):
        raise UserError(f"--output_dir {sweep_dir} exists and is not a folder")
    existing = os.path.isfile(marker)
    if existing:
        try:
            with open(marker, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{marker}: cannot read it ({first_line(e)})") from None
        if info.get("study_name") != spec.study_name or info.get("storage") != mask_password(url):
            raise UserError(f"--output_dir {sweep_dir} holds study {info.get('study_name')!r} in "
                            f"{info.get('storage')}, not {spec.study_name!r} in {mask_password(url)}: use another "
                            "folder, or the same study_name and --storage")
        if storage_url is None and not os.path.isfile(os.path.join(sweep_dir, STUDY_DB)):
            raise UserError(f"--output_dir {sweep_dir} is a sweep folder without its {STUDY_DB}: its trials "
                            "belong to a study that is gone; use a new folder")
    elif os.path.isdir(sweep_dir) and os.listdir(sweep_dir):
        raise UserError(f"--output_dir {sweep_dir} is not empty and not a sweep folder (no {SWEEP_JSON}); use a new "
                        "folder")
    if storage_url is not None:  # a database elsewhere: reachable, and still holding the study, before writing here
        names = study_names(make_storage(spec, url, heartbeat=False))
        if existing and spec.study_name not in names:
            raise UserError(f"--storage {mask_password(url)} has no study {spec.study_name!r} any more, but "
                            f"{sweep_dir} holds its trials: use a new folder")
    try:
        os.makedirs(sweep_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {sweep_dir}: cannot create it ({first_line(e)})") from None
    return url


def mark_sweep_dir(spec: SweepSpec, sweep_dir: str, url: str) -> None:
    """Write sweep.json and the copy of the sweep file, once the study has accepted the sweep file."""
    try:
        _write(os.path.join(sweep_dir, SWEEP_JSON),
               json.dumps({"study_name": spec.study_name, "storage": mask_password(url)}, indent=1) + "\n")
        with open(spec.path, encoding="utf-8") as f:
            _write(os.path.join(sweep_dir, SWEEP_YAML), f.read())
    except OSError as e:
        raise UserError(f"--output_dir {sweep_dir}: cannot write it ({first_line(e)})") from None


def _write(path: str, text: str) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def open_study(spec: SweepSpec, url: str, heartbeat: bool = True):
    """The study (created on first use). A study made from a sweep file that differs in what its trials depend on
    (base, space, seeds, objective, sampler, pruner) is refused, naming the first difference."""
    import optuna

    storage = make_storage(spec, url, heartbeat)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction,
                                    sampler=spec.make_sampler(worker_number()), pruner=_pruner(spec),
                                    load_if_exists=True)
    except Exception as e:  # noqa: BLE001 - database errors
        raise UserError(f"--storage {mask_password(url)}: cannot open study {spec.study_name!r}: "
                        f"{first_line(e)}") from None
    identity = json.loads(json.dumps(spec.identity()))  # as stored: tuples become lists
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if stored is None:
        study.set_user_attr(IDENTITY_ATTR, identity)
    elif stored != identity:
        key = next(k for k in identity if identity[k] != stored.get(k))
        raise UserError(f"study {spec.study_name!r} was made from a sweep file with another {key} "
                        f"({json.dumps(stored.get(key))[:200]}); use a new --output_dir (or study_name) for "
                        "this one")
    if study.direction.name.lower() != spec.direction:
        raise UserError(f"study {spec.study_name!r} is to {study.direction.name.lower()}, but the objective "
                        f"{spec.objective} is to {spec.direction}")
    return study


def worker_number() -> int:
    name = os.environ.get(WORKER_ENV, "")
    return int(name) if name.isdigit() else 0


def _pruner(spec: SweepSpec):
    import optuna

    from .pruning import make_pruner

    return make_pruner(spec.pruner) if spec.pruner else optuna.pruners.NopPruner()


def sweep_trackers_env(spec: SweepSpec, study, sweep_dir: str) -> dict:
    """Environment for the trials' runs that groups them in the trackers. W&B: the group (set in the run
    options); TensorBoard: nothing (each run writes under SWEEP_DIR, so `tensorboard --logdir SWEEP_DIR` shows
    them all); MLflow: the sweep's store and its parent run, made once per study, under which every run nests."""
    from .config import RunConfig
    from .tracking import MLFLOW_PARENT_ENV

    trackers = RunConfig(report_to=spec.base.get("report_to", ["none"])).trackers
    if "mlflow" not in trackers:
        return {}
    try:
        import mlflow
    except ImportError:
        return {}  # each run says that MLflow is off
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(os.path.abspath(sweep_dir), MLFLOW_DB)}"
    parent = study.user_attrs.get(MLFLOW_PARENT_ATTR)
    if parent is None:
        try:
            client = mlflow.MlflowClient(uri)
            project = spec.base.get("wandb_project", "afqmc-dist")
            experiment = client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                project, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI")
                else os.path.join(os.path.abspath(sweep_dir), MLFLOW_ARTIFACTS))
            run = client.create_run(experiment_id, run_name=spec.study_name, tags={"afqmc.sweep": spec.study_name})
            for param in spec.space:
                client.log_param(run.info.run_id, param.name, param.describe())
            parent = run.info.run_id
            study.set_user_attr(MLFLOW_PARENT_ATTR, parent)
        except Exception as e:  # noqa: BLE001 - MLflow raises many types
            print(f"MLflow: the sweep's parent run could not be made ({type(e).__name__}: {first_line(e)}); "
                  "each trial's run is logged on its own", flush=True)
            return {}
    return {"MLFLOW_TRACKING_URI": uri, MLFLOW_PARENT_ENV: parent}


def close_mlflow_parent(env: dict, study, spec: SweepSpec) -> None:
    """When the study has all its trials: the MLflow parent run gets the best value and is marked finished."""
    from .tracking import MLFLOW_PARENT_ENV

    if MLFLOW_PARENT_ENV not in env:
        return
    try:
        import mlflow

        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        try:
            client.log_metric(env[MLFLOW_PARENT_ENV], f"best_{spec.objective}", study.best_value)
        except ValueError:
            pass  # no complete trial
        client.set_terminated(env[MLFLOW_PARENT_ENV])
    except Exception as e:  # noqa: BLE001 - the study is done whatever MLflow says
        print(f"MLflow: the sweep's parent run could not be closed ({type(e).__name__}: {first_line(e)})", flush=True)
