"""Where metrics go: OUTPUT_DIR/metrics.jsonl always, and the trackers of --report_to (W&B, TensorBoard, MLflow)
through accelerate's tracker classes.

Every `Tracker.log` call is one metrics.jsonl line holding exactly the numbers that go to every tracker, under the
same names and at the same step:

    {"step": 40, "epoch": 2, "train/loss": 0.41, "train/learning_rate": 8e-06, "train/grad_norm": 3.2, ...}
    {"step": 64, "epoch": 2, "dev/accuracy": 0.74, "dev/f1": 0.55, ..., "dev/confusion_matrix": [[..], [..]]}

A number that is not finite (a NaN loss, an infinite gradient norm) is left out of the line and of every tracker:
metrics.jsonl is strict JSON, never `NaN` or `Infinity`.

The trackers (each only when named in --report_to; `all` is the three):

- wandb: a W&B run, offline with WANDB_MODE=offline (no network or login; the run folder goes to OUTPUT_DIR/wandb
  unless WANDB_DIR says otherwise; `wandb sync` it later). The confusion matrix goes there as a table.
- tensorboard: event files in OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR`; for a sweep, the sweep
  folder compares its trials). Scalars are written in double precision, so they read back exactly as logged.
- mlflow: a run in the tracking store of MLFLOW_TRACKING_URI, by default `sqlite:///OUTPUT_DIR/mlflow.db` with
  artifacts in OUTPUT_DIR/mlruns (MLflow 3 refuses a plain folder as a store); the experiment is --wandb_project.
  In a sweep trial the run is nested under the sweep's parent run ($AFQMC_MLFLOW_PARENT_RUN_ID, set by sweep.py).

Each gets the run's configuration at the start (W&B config, TensorBoard hparams, MLflow params) and the final
values of `summarize` (W&B summary; TensorBoard and MLflow: metrics at the last step). Trackers run on the main
process only (a multi-process run makes one run per tracker); their packages are imported only when asked for.
A tracker that cannot start (not installed, no login, a bad URI) is reported in one line and left out: the run
goes on with metrics.jsonl and the other trackers, unless --require_tracker is set, which stops it (exit 2).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

from accelerate.utils import broadcast_object_list

from .errors import UserError, first_line
from .files import write_error
from .outputs import BEST_DIR, METRICS, MLFLOW_ARTIFACTS, MLFLOW_DB, TENSORBOARD_DIR

MLFLOW_PARENT_ENV = "AFQMC_MLFLOW_PARENT_RUN_ID"
# name: (shown as, package to import, how to install it, what else it needs to start)
TRACKER_INFO = {
    "wandb": ("W&B", "wandb", "pip install wandb", "log in with `wandb login`, or set WANDB_MODE=offline"),
    "tensorboard": ("TensorBoard", "tensorboard", "pip install tensorboard", None),
    "mlflow": ("MLflow", "mlflow", "pip install mlflow-skinny", "check MLFLOW_TRACKING_URI"),
}
NOT_INSTALLED = "is not installed"


def how_to_start(name: str, failure: str) -> str:
    """What gets tracker `name` going after `failure`: installing it, or its set-up (a login, a URI)."""
    _, _, install, setup = TRACKER_INFO[name]
    return install if NOT_INSTALLED in failure or setup is None else setup


# TensorBoard stores scalars as float32 unless asked for doubles (new_style keeps the step and wall time too).
TENSORBOARD_SCALARS = {"new_style": True, "double_precision": True}


def finite_numbers(values: dict) -> dict:
    """The entries of `values` that are finite int/float numbers (booleans excluded)."""
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _is_loggable(value) -> bool:
    """True for what metrics.jsonl keeps: anything but None and non-finite numbers."""
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


class Tracker:
    """Logs training and evaluation records. Construct and call on EVERY rank; only the main process writes.

    `resume_id`: the W&B run id of the run being resumed, so that its charts continue instead of starting over
    (TensorBoard appends to the same folder; MLflow starts a new run, tagged with the same output folder).
    """

    def __init__(self, accelerator, cfg, run_info: dict, resume_id: str | None = None):
        self.accelerator = accelerator
        self.metrics_path = os.path.join(cfg.output_dir, METRICS)
        self.label_list = list(cfg.label_list)
        self.last_step = 0
        self.trackers: dict = {}  # name -> started accelerate tracker (main process only)
        failures = {}
        if accelerator.is_main_process:
            config = {**cfg.to_dict(), **run_info}
            for name in cfg.trackers:
                try:
                    tracker = self._start(name, cfg, config, resume_id)
                except Exception as e:  # noqa: BLE001 - trackers raise many types (UsageError, MlflowException, ...)
                    failures[name] = f"{type(e).__name__}: {first_line(e)}"
                else:
                    self.trackers[name] = tracker
                    accelerator.trackers.append(tracker)  # so that accelerator.end_training() finishes it
        # Only the main process tried: tell every rank, so that all take the same branch (and stop together).
        failures, started = broadcast_object_list([failures, sorted(self.trackers)])
        self.started = set(started)
        if failures and cfg.require_tracker:
            self.finish_trackers()
            name, failure = next(iter(failures.items()))
            raise UserError(f"--report_to {name}: {TRACKER_INFO[name][0]} did not start ({failure}); "
                            f"{how_to_start(name, failure)}")
        others = ", ".join([METRICS, *(TRACKER_INFO[n][0] for n in cfg.trackers if n in self.started)])
        for name, failure in failures.items():
            where = f"{METRICS} only" if others == METRICS else others
            self.accelerator.print(f"{TRACKER_INFO[name][0]} is off: it did not start ({failure}); metrics go to "
                                   f"{where} ({how_to_start(name, failure)} to use it, --require_tracker to stop)")

    # --- starting each tracker (main process) ---------------------------------------------------------------

    def _start(self, name: str, cfg, config: dict, resume_id: str | None):
        package = TRACKER_INFO[name][1]
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"{package} {NOT_INSTALLED}")
        return getattr(self, f"_start_{name}")(cfg, config, resume_id)

    def _start_wandb(self, cfg, config: dict, resume_id: str | None):
        from accelerate.tracking import WandBTracker

        kwargs = {"name": cfg.run_name, "entity": cfg.wandb_entity, "group": cfg.wandb_group,
                  "tags": cfg.wandb_tags or None}
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = cfg.output_dir
        tracker = WandBTracker(cfg.wandb_project, **kwargs)
        tracker.start()
        tracker.store_init_configuration(config)
        return tracker

    def _start_tensorboard(self, cfg, config: dict, resume_id: str | None):
        from accelerate.tracking import TensorBoardTracker

        # accelerate writes to logging_dir/run_name: OUTPUT_DIR/tensorboard.
        tracker = TensorBoardTracker(TENSORBOARD_DIR, cfg.output_dir)
        tracker.start()
        tracker.store_init_configuration(_hparams(config))
        return tracker

    def _start_mlflow(self, cfg, config: dict, resume_id: str | None):
        import mlflow
        from accelerate.tracking import MLflowTracker

        output_dir = os.path.abspath(cfg.output_dir)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(output_dir, MLFLOW_DB)}"
        mlflow.set_tracking_uri(uri)
        tags = {"afqmc.output_dir": output_dir}
        if os.environ.get(MLFLOW_PARENT_ENV):
            tags["mlflow.parentRunId"] = os.environ[MLFLOW_PARENT_ENV]
        # A new experiment in the default local store keeps its artifacts beside the database.
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else os.path.join(output_dir, MLFLOW_ARTIFACTS)
        tracker = MLflowTracker(cfg.wandb_project, logging_dir=artifacts, run_name=cfg.run_name, tags=tags)
        tracker.start()
        try:
            tracker.store_init_configuration(config)
        except Exception:
            mlflow.end_run("FAILED")  # a half-started run must not stay active in this process
            raise
        return tracker

    # --- logging --------------------------------------------------------------------------------------------

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run id (main process, W&B on), stored in checkpoints so a resumed run continues it."""
        tracker = self.trackers.get("wandb")
        return tracker.run.id if tracker is not None else None

    def log(self, values: dict, prefix: str, step: int | None = None, epoch: int | None = None,
            summary: bool = False) -> None:
        """Record `values` as `prefix/<name>` at `step` (default: the last step logged, as W&B ignores steps that
        go backwards): one metrics.jsonl line, and its numbers to every tracker; with `summary`, also as final
        values (see `summarize`). None and non-finite numbers are left out everywhere. Lists (the confusion
        matrix) go to metrics.jsonl as they are and to W&B as a table."""
        self.last_step = max(self.last_step, step or 0)
        named = {f"{prefix}/{k}": v for k, v in values.items() if _is_loggable(v)}
        if not self.accelerator.is_main_process:
            return
        record = {"step": self.last_step, **({"epoch": epoch} if epoch is not None else {}), **named}
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        except OSError as e:  # a full disk: one line naming the file and the free space, not a traceback
            raise UserError(write_error(self.metrics_path, e)) from None
        numbers = finite_numbers(named)
        for name, tracker in self.trackers.items():
            if name == "wandb":
                tables = {k: _wandb_table(v, self.label_list) for k, v in named.items()
                          if k.endswith("confusion_matrix")}
                tracker.log({**numbers, **tables}, step=self.last_step)
            elif name == "tensorboard":
                tracker.log(numbers, step=self.last_step, **TENSORBOARD_SCALARS)
            else:
                tracker.log(numbers, step=self.last_step)
        if summary:
            self.summarize(numbers)

    def summarize(self, values: dict) -> None:
        """Final values (best dev accuracy, ...): the W&B run summary, and TensorBoard/MLflow metrics at the last
        step logged. Non-finite numbers are left out."""
        if not self.accelerator.is_main_process:
            return
        numbers = finite_numbers(values)
        for name, tracker in self.trackers.items():
            if name == "wandb":
                tracker.run.summary.update(numbers)
            elif name == "tensorboard":
                tracker.log(numbers, step=self.last_step, **TENSORBOARD_SCALARS)
            else:
                tracker.log(numbers, step=self.last_step)

    def log_model(self, output_dir: str, name: str) -> None:
        """Upload OUTPUT_DIR/best as a W&B model artifact (main process, W&B on)."""
        tracker = self.trackers.get("wandb")
        if tracker is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type="model")
        artifact.add_dir(os.path.join(output_dir, BEST_DIR))
        tracker.run.log_artifact(artifact)

    def finish_trackers(self) -> None:
        """End every started tracker's run (main process); the next `finish` has nothing left to end."""
        for tracker in self.trackers.values():
            tracker.finish()
            self.accelerator.trackers.remove(tracker)
        self.trackers = {}

    def finish(self) -> None:
        """End the trackers' runs (and, through accelerate, the process group). Call on every rank."""
        self.accelerator.end_training()
        self.trackers = {}


def _hparams(config: dict) -> dict:
    """The run configuration as TensorBoard hparams take it: numbers, strings and booleans (lists joined,
    None left out)."""
    values = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        if isinstance(value, (bool, int, float, str)):
            values[key] = value
    return values


def _wandb_table(matrix: list[list[int]], labels: list[str]):
    """A confusion matrix (rows: true label, columns: predicted) as a W&B table with one row per cell."""
    import wandb

    table = wandb.Table(columns=["actual", "predicted", "count"])
    for actual, row in zip(labels, matrix):
        for predicted, count in zip(labels, row):
            table.add_data(actual, predicted, count)
    return table


# --- a sweep's parent run -------------------------------------------------------------------------------------

def mlflow_sweep_parent(sweep_dir: str, project: str, study_name: str, params: dict[str, str],
                        parent_id: str | None) -> dict:
    """The environment that nests every trial's MLflow run under the sweep's parent run (made here when
    `parent_id` is None, with the searched `params` as its parameters): {} when MLflow is not installed or cannot
    start (each trial's run then says that MLflow is off, or logs on its own). The store: MLFLOW_TRACKING_URI, by
    default sqlite:///SWEEP_DIR/mlflow.db with artifacts in SWEEP_DIR/mlruns."""
    try:
        import mlflow
    except ImportError:
        return {}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(os.path.abspath(sweep_dir), MLFLOW_DB)}"
    if parent_id is None:
        try:
            client = mlflow.MlflowClient(uri)
            experiment = client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                project, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI")
                else os.path.join(os.path.abspath(sweep_dir), MLFLOW_ARTIFACTS))
            run = client.create_run(experiment_id, run_name=study_name, tags={"afqmc.sweep": study_name})
            for name, value in params.items():
                client.log_param(run.info.run_id, name, value)
            parent_id = run.info.run_id
        except Exception as e:  # noqa: BLE001 - MLflow raises many types
            print(f"MLflow: the sweep's parent run could not be made ({type(e).__name__}: {first_line(e)}); "
                  "each trial's run is logged on its own", flush=True)
            return {}
    return {"MLFLOW_TRACKING_URI": uri, MLFLOW_PARENT_ENV: parent_id}


def close_mlflow_sweep_parent(env: dict, metric: str, best_value: float | None) -> None:
    """When the study has all its trials: the parent run gets the best value and is marked finished."""
    if MLFLOW_PARENT_ENV not in env:
        return
    try:
        import mlflow

        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        if best_value is not None:
            client.log_metric(env[MLFLOW_PARENT_ENV], metric, best_value)
        client.set_terminated(env[MLFLOW_PARENT_ENV])
    except Exception as e:  # noqa: BLE001 - the study is done whatever MLflow says
        print(f"MLflow: the sweep's parent run could not be closed ({type(e).__name__}: {first_line(e)})", flush=True)
