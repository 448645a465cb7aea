"""Where metrics go: OUTPUT_DIR/metrics.jsonl always, and Weights & Biases through accelerate's trackers.

Every `Tracker.log` call is one metrics.jsonl line holding exactly what goes to W&B, under the same names:

    {"step": 40, "epoch": 2, "train/loss": 0.41, "train/learning_rate": 8e-06, "train/grad_norm": 3.2, ...}
    {"step": 64, "epoch": 2, "dev/accuracy": 0.74, "dev/f1": 0.55, ..., "dev/confusion_matrix": [[..], [..]]}

W&B is only touched when `--report_to wandb` is given. It runs on the main process only (accelerate's
`init_trackers`/`log` are no-ops elsewhere), so a multi-process run makes one W&B run. With
`WANDB_MODE=offline` it needs no network or login; the run folder goes to OUTPUT_DIR/wandb unless WANDB_DIR
says otherwise (sync it later with `wandb sync OUTPUT_DIR/wandb/offline-run-*`). If W&B cannot start (no API
key, no network) the run says why in one line and goes on with metrics.jsonl, unless --require_tracker is set.
"""

from __future__ import annotations

import json
import os

from accelerate.utils import broadcast_object_list

from .errors import UserError, first_line
from .outputs import BEST_DIR, METRICS


class Tracker:
    """Logs training and evaluation records. Construct and call on EVERY rank; only the main process writes.

    `resume_id`: the W&B run id of the run being resumed, so that its charts continue instead of starting over.
    """

    def __init__(self, accelerator, cfg, run_info: dict, resume_id: str | None = None):
        self.accelerator = accelerator
        self.metrics_path = os.path.join(cfg.output_dir, METRICS)
        self.label_list = list(cfg.label_list)
        self.last_step = 0
        self.use_wandb = "wandb" in cfg.trackers and self._start_wandb(cfg, run_info, resume_id)

    def _start_wandb(self, cfg, run_info: dict, resume_id: str | None) -> bool:
        """Start the W&B run on the main process; True if it started (the same answer on every rank)."""
        wandb_kwargs = {"name": cfg.run_name, "entity": cfg.wandb_entity, "group": cfg.wandb_group,
                        "tags": cfg.wandb_tags or None}
        if resume_id:
            wandb_kwargs.update(id=resume_id, resume="allow")
        if not os.environ.get("WANDB_DIR"):
            wandb_kwargs["dir"] = cfg.output_dir
        failure = None
        if self.accelerator.is_main_process:
            try:
                self.accelerator.init_trackers(cfg.wandb_project, config={**cfg.to_dict(), **run_info},
                                               init_kwargs={"wandb": wandb_kwargs})
            except Exception as e:  # noqa: BLE001 - wandb raises many types (UsageError, CommError, ...)
                failure = f"{type(e).__name__}: {first_line(e)}"
                self.accelerator.trackers = []  # the half-started tracker must not be logged to or finished
        # Only the main process tried: tell every rank, so that all take the same branch (and stop together).
        failure = broadcast_object_list([failure])[0]
        if failure and cfg.require_tracker:
            raise UserError(f"--report_to wandb: W&B did not start ({failure}); log in with `wandb login`, "
                            "or set WANDB_MODE=offline")
        if failure:
            self.accelerator.print(f"W&B is off: it did not start ({failure}); metrics go to {METRICS} only "
                                   "(`wandb login` or WANDB_MODE=offline to use it, --require_tracker to stop)")
        return not failure

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run id (main process, W&B on), stored in checkpoints so a resumed run continues it."""
        if self.use_wandb and self.accelerator.is_main_process:
            return self.accelerator.get_tracker("wandb", unwrap=True).id
        return None

    def log(self, values: dict, prefix: str, step: int | None = None, epoch: int | None = None,
            summary: bool = False) -> None:
        """Record `values` as `prefix/<name>` at `step` (default: the last step logged, as W&B ignores steps that
        go backwards): one metrics.jsonl line, and the same values to W&B; with `summary`, also into the W&B run
        summary. Lists (the confusion matrix) go to metrics.jsonl as they are and to W&B as a table."""
        self.last_step = max(self.last_step, step or 0)
        named = {f"{prefix}/{k}": v for k, v in values.items() if v is not None}
        if not self.accelerator.is_main_process:
            return
        record = {"step": self.last_step, **({"epoch": epoch} if epoch is not None else {}), **named}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.use_wandb:
            numbers = {k: v for k, v in named.items() if isinstance(v, (int, float))}
            tables = {k: _wandb_table(v, self.label_list) for k, v in named.items() if k.endswith("confusion_matrix")}
            self.accelerator.log({**numbers, **tables}, step=self.last_step)
            if summary:
                self.summarize(numbers)

    def summarize(self, values: dict) -> None:
        """Put final values (best dev accuracy, ...) in the W&B run summary."""
        if self.use_wandb and self.accelerator.is_main_process:
            self.accelerator.get_tracker("wandb", unwrap=True).summary.update(values)

    def log_model(self, output_dir: str, name: str) -> None:
        """Upload OUTPUT_DIR/best as a W&B model artifact (main process, W&B on)."""
        if not (self.use_wandb and self.accelerator.is_main_process):
            return
        import wandb

        artifact = wandb.Artifact(name, type="model")
        artifact.add_dir(os.path.join(output_dir, BEST_DIR))
        self.accelerator.get_tracker("wandb", unwrap=True).log_artifact(artifact)

    def finish(self) -> None:
        self.accelerator.end_training()


def _wandb_table(matrix: list[list[int]], labels: list[str]):
    """A confusion matrix (rows: true label, columns: predicted) as a W&B table with one row per cell."""
    import wandb

    table = wandb.Table(columns=["actual", "predicted", "count"])
    for actual, row in zip(labels, matrix):
        for predicted, count in zip(labels, row):
            table.add_data(actual, predicted, count)
    return table
