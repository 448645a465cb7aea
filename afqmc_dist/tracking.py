"""Where metrics go: OUTPUT_DIR/metrics.jsonl always, and Weights & Biases through accelerate's trackers.

W&B is only touched when `--report_to wandb` is given. It runs on the main process only (accelerate's
`init_trackers`/`log` are no-ops elsewhere), so a multi-process run makes one W&B run. With
`WANDB_MODE=offline` it needs no network or login; the run folder goes to OUTPUT_DIR/wandb unless WANDB_DIR
says otherwise (sync it later with `wandb sync OUTPUT_DIR/wandb/offline-run-*`).
"""

from __future__ import annotations

import json
import os

from accelerate.utils import broadcast_object_list

from .errors import UserError, first_line
from .outputs import METRICS


class Tracker:
    """Logs training and evaluation records. Construct and call on EVERY rank; only the main process writes."""

    def __init__(self, accelerator, cfg, run_info: dict):
        self.accelerator = accelerator
        self.metrics_path = os.path.join(cfg.output_dir, METRICS)
        self.use_wandb = cfg.report_to == "wandb"
        self.last_step = 0
        if self.use_wandb:
            self._start_wandb(cfg, run_info)

    def _start_wandb(self, cfg, run_info: dict) -> None:
        wandb_kwargs = {"name": cfg.run_name}
        if not os.environ.get("WANDB_DIR"):
            wandb_kwargs["dir"] = cfg.output_dir
        failure = None
        if self.accelerator.is_main_process:
            try:
                self.accelerator.init_trackers(cfg.wandb_project, config={**cfg.to_dict(), **run_info},
                                               init_kwargs={"wandb": wandb_kwargs})
            except Exception as e:  # noqa: BLE001 - wandb raises many types (UsageError, CommError, ...)
                failure = f"{type(e).__name__}: {first_line(e)}"
        # Only the main process started W&B: tell every rank, so that all stop together instead of hanging.
        failure = broadcast_object_list([failure])[0]
        if failure:
            raise UserError(f"--report_to wandb: W&B did not start ({failure}); log in with `wandb login`, "
                            "or set WANDB_MODE=offline")

    def log(self, values: dict, prefix: str, step: int | None = None, summary: bool = False) -> None:
        """Send the numbers of `values` to the tracker as `prefix/<name>` at `step` (default: the last step
        logged, as W&B ignores steps that go backwards); with `summary`, also into the run summary."""
        self.last_step = max(self.last_step, step or 0)
        numbers = {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=self.last_step)
        if summary:
            self.summarize(numbers)

    def log_eval(self, metrics: dict, epoch: int, step: int) -> dict:
        """Record a dev evaluation: a metrics.jsonl line `{"epoch", "step", "dev_<name>": ...}` (returned) and
        `dev/<name>` values for the tracker."""
        record = {"epoch": epoch, "step": step, **{f"dev_{k}": v for k, v in metrics.items()}}
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.log(metrics, "dev", step)
        return record

    def summarize(self, values: dict) -> None:
        """Put final values (best dev accuracy, ...) in the W&B run summary."""
        if self.use_wandb and self.accelerator.is_main_process:
            self.accelerator.get_tracker("wandb", unwrap=True).summary.update(values)

    def finish(self) -> None:
        self.accelerator.end_training()
