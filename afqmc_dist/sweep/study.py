"""A sweep's folder and its study: opening the Optuna storage, tying the folder to its study, and giving every
worker process a sampler seed of its own.

SWEEP_DIR holds:

    sweep.json        {"study_name", "storage"}: marks the folder as a sweep's; "storage" is the URL without its
                      password, or "study.db" for the folder's own (the folder can be moved)
    sweep.yaml        a copy of the sweep file of the last run of the command
    study.db          the study (SQLite), unless --storage names another database
    workers.json      how many worker processes have started on the study: each draws with its own sampler seed
    .sweep.lock       held while a worker starts (the storage is created and seeds are handed out one at a time)
    trials/NNNN/      each trial's seed runs and trial.json, which ties the folder to its study (runs.py)
    mlflow.db, mlruns the MLflow store, with --report_to mlflow (unless MLFLOW_TRACKING_URI is set)
    sweep.md, sweep.png, best_config.yaml   written by `python -m afqmc_dist.report SWEEP_DIR`

A study is made once, with a random id (its `afqmc_sweep_uid` user attribute) that every trial folder records. A
folder whose study is gone from its storage (study.db deleted or emptied, the study deleted), or whose trial
folders belong to another study, is refused: its checkpoints would be resumed as the new study's trials.

Sampler seeds. A sweep file's `sampler: {seed: S}` makes the FIRST worker process of a study draw with seed S
(one worker on a new study repeats exactly); the n-th process to start on the study (a second machine running the
same command, a rerun after a stop, a SLURM array task) draws with S + n, so no two draw the same
configurations. Each trial records the seed it was drawn with (user attribute `sampler_seed`). A grid is the
exception: Optuna's GridSampler gives trial N the N-th point of the grid as shuffled by its seed, so every worker
keeps the sweep file's seed (the same order everywhere: each trial number is another point).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
import warnings

from filelock import FileLock

from ..errors import UserError, first_line, mask_secrets
from ..files import atomic_open
from .runs import check_trial_folders
from .spec import SweepSpec

SWEEP_JSON, SWEEP_YAML, STUDY_DB, WORKERS_JSON, LOCK_FILE = (
    "sweep.json", "sweep.yaml", "study.db", "workers.json", ".sweep.lock")
IDENTITY_ATTR, UID_ATTR, MLFLOW_PARENT_ATTR = "afqmc_sweep", "afqmc_sweep_uid", "mlflow_parent_run_id"
# Names a worker in its lines: 1..N for --workers N, the array task id under SLURM.
WORKER_ENV = "AFQMC_SWEEP_WORKER"
# What SQLAlchemy needs for a PostgreSQL URL, by driver, best first (SQLAlchemy 2.1 maps postgresql:// to psycopg 3).
POSTGRES_DRIVERS = (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2"))
OPEN_ATTEMPTS = 3  # a study created by two machines at once: the loser of the race opens it on the next try


def storage_url(url: str) -> str:
    """`url` with a PostgreSQL driver SQLAlchemy can import: the documented `postgresql://user@host/db` uses
    whichever of psycopg (3) and psycopg2 is installed. UserError when neither is."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    for module, scheme in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"{scheme}://{url.split('://', 1)[1]}"
    raise UserError(f"--storage {mask_secrets(url)}: no PostgreSQL driver is installed: pip install 'psycopg[binary]'")


def make_storage(url: str, heartbeat: SweepSpec | None = None):
    """The Optuna RDB storage at `url`; with `heartbeat` (the sweep's spec), the worker's: heartbeats and
    retries of stale trials."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    url = storage_url(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notices of the heartbeat and its callback
            kwargs = {} if heartbeat is None else {
                "heartbeat_interval": heartbeat.heartbeat_interval, "grace_period": heartbeat.grace_period,
                "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback()}
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as e:  # noqa: BLE001 - a missing driver, a refused connection, a bad URL: many types
        raise UserError(f"--storage {mask_secrets(url)}: cannot open it: {first_line(e)}") from None


def open_sweep(spec: SweepSpec, sweep_dir: str, storage: str | None, worker: bool):
    """Check SWEEP_DIR against the study, create both if new, and return (storage URL, study, sampler seed).

    Held under SWEEP_DIR/.sweep.lock, so that workers started together create the storage once. `worker`: this
    process will draw trials, so it gets the next sampler seed. UserError for a folder that is not this sweep's
    (see the module docstring); a new folder that is refused is left as it was found (absent)."""
    if os.path.exists(sweep_dir) and not os.path.isdir(sweep_dir):
        raise UserError(f"--output_dir {sweep_dir} exists and is not a folder")
    if os.path.isdir(sweep_dir) and not _is_sweep_dir(sweep_dir) and os.listdir(sweep_dir):
        raise UserError(f"--output_dir {sweep_dir} is not empty and not a sweep folder (no {SWEEP_JSON}); use a new "
                        "folder")
    created = not os.path.isdir(sweep_dir)
    try:
        os.makedirs(sweep_dir, exist_ok=True)
        lock = FileLock(os.path.join(sweep_dir, LOCK_FILE))
        with lock:
            url = _check_folder(spec, sweep_dir, storage)
            study = _open_study(spec, url)
            check_trial_folders(sweep_dir, spec.study_name, study.user_attrs[UID_ATTR])
            _mark(spec, sweep_dir, storage)
            seed = _claim_sampler_seed(spec, sweep_dir) if worker else None
            if seed is not None:
                study.sampler = spec.make_sampler(seed)
    except OSError as e:
        if created:
            _remove_new_folder(sweep_dir)
        raise UserError(f"--output_dir {sweep_dir}: cannot write it ({e.strerror or first_line(e)})") from None
    except BaseException:
        if created:
            _remove_new_folder(sweep_dir)
        raise
    return url, study, seed


def _is_sweep_dir(folder: str) -> bool:
    """A sweep's folder, or one a sweep command is making right now (its lock file is there)."""
    return os.path.isfile(os.path.join(folder, SWEEP_JSON)) or os.path.exists(os.path.join(folder, LOCK_FILE))


def _remove_new_folder(folder: str) -> None:
    """Undo the creation of a sweep folder this command made and then refused: only its own files go."""
    for name in (LOCK_FILE, STUDY_DB, WORKERS_JSON):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
    try:
        os.rmdir(folder)
    except OSError:
        pass


def folder_storage(sweep_dir: str, recorded: str) -> str:
    """The storage URL that sweep.json's "storage" stands for: "study.db" is the folder's own."""
    return f"sqlite:///{os.path.join(os.path.abspath(sweep_dir), STUDY_DB)}" if recorded == STUDY_DB else recorded


def _check_folder(spec: SweepSpec, sweep_dir: str, storage: str | None) -> str:
    """The storage URL of this sweep, after checking that SWEEP_DIR and the storage belong to it."""
    url = folder_storage(sweep_dir, storage or STUDY_DB)
    marker = os.path.join(sweep_dir, SWEEP_JSON)
    if not os.path.isfile(marker):
        if storage is not None:
            make_storage(url)  # reachable, before anything is written here
        return url
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{marker}: cannot read it ({first_line(e)})") from None
    recorded = mask_secrets(storage) if storage else STUDY_DB
    if info.get("study_name") != spec.study_name or info.get("storage") != recorded:
        raise UserError(f"--output_dir {sweep_dir} holds study {info.get('study_name')!r} in {info.get('storage')}, "
                        f"not {spec.study_name!r} in {recorded}: use another folder, or the same study_name and "
                        "--storage")
    database = os.path.join(sweep_dir, STUDY_DB)
    gone = f"--output_dir {sweep_dir} holds the trials of study {spec.study_name!r}, but"
    if storage is None and not (os.path.isfile(database) and os.path.getsize(database) > 0):
        raise UserError(f"{gone} its {STUDY_DB} is {'empty' if os.path.isfile(database) else 'gone'}: its trial "
                        "folders would be mixed with a new study's; use a new folder")
    import optuna

    if spec.study_name not in optuna.study.get_all_study_names(make_storage(url)):
        raise UserError(f"{gone} {mask_secrets(url)} has no such study any more: its trial folders would be mixed "
                        "with a new study's; use a new folder")
    return url


def _claim_sampler_seed(spec: SweepSpec, sweep_dir: str) -> int | None:
    """This worker process's sampler seed: the sweep file's plus the number of workers started before it (see the
    module docstring). None when the sweep file gives no seed, and for a grid (every worker shuffles it alike)."""
    path = os.path.join(sweep_dir, WORKERS_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            started = int(json.load(f)["started"])
    except FileNotFoundError:
        started = 0
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read it ({first_line(e)}); remove it to count worker starts afresh") from None
    _write(path, json.dumps({"started": started + 1}) + "\n")
    base = spec.sampler_seed
    return None if base is None or spec.sampler["type"] == "grid" else (base + started) % 2**32


def _open_study(spec: SweepSpec, url: str):
    """The study (created on first use, with its id). A study made from a sweep file that differs in what its
    trials depend on (base, space, seeds, objective, sampler, pruner) is refused, naming the first difference."""
    import optuna

    storage = make_storage(url, heartbeat=spec)
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.direction,
                                        sampler=spec.make_sampler(), pruner=spec.make_pruner(),
                                        load_if_exists=True)
            break
        except Exception as e:  # noqa: BLE001 - database errors
            if attempt == OPEN_ATTEMPTS:
                raise UserError(f"--storage {mask_secrets(url)}: cannot open study {spec.study_name!r}: "
                                f"{first_line(e)}") from None
            time.sleep(attempt)
    identity = json.loads(json.dumps(spec.identity()))  # as stored: tuples become lists
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if stored is None:
        study.set_user_attr(IDENTITY_ATTR, identity)
        study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    elif stored != identity:
        key = next(k for k in identity if identity[k] != stored.get(k))
        raise UserError(f"study {spec.study_name!r} was made from a sweep file with another {key} "
                        f"({json.dumps(stored.get(key))[:200]}); use a new --output_dir (or study_name) for "
                        "this one")
    if UID_ATTR not in study.user_attrs:
        raise UserError(f"study {spec.study_name!r} was made by an older version of this tool, whose trial folders "
                        "cannot be told from another study's; use a new --output_dir")
    if study.direction.name.lower() != spec.direction:
        raise UserError(f"study {spec.study_name!r} is to {study.direction.name.lower()}, but the objective "
                        f"{spec.objective} is to {spec.direction}")
    return study


def _mark(spec: SweepSpec, sweep_dir: str, storage: str | None) -> None:
    """Write sweep.json and the copy of the sweep file, once the study has accepted the sweep file."""
    recorded = mask_secrets(storage) if storage else STUDY_DB
    _write(os.path.join(sweep_dir, SWEEP_JSON),
           json.dumps({"study_name": spec.study_name, "storage": recorded}, indent=1) + "\n")
    with open(spec.path, encoding="utf-8") as f:
        _write(os.path.join(sweep_dir, SWEEP_YAML), f.read())


def _write(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def worker_name() -> str | None:
    return os.environ.get(WORKER_ENV)
