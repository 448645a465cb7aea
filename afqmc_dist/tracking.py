"""Where metrics go: OUTPUT_DIR/metrics.jsonl always, and Weights & Biases through accelerate's trackers.

W&B is only touched when `--report_to wandb` is given. It runs on the main process only (accelerate's
`init_trackers`/`log` are no-ops elsewhere), so a multi-process run makes one W&B run. With
`WANDB_MODE=offline` it needs no network or login; the run folder goes to OUTPUT_DIR/wandb unless WANDB_DIR
says otherwise (sync it later with `wandb sync OUTPUT_DIR/wandb/offline-run-*`).
"""

from __future__ import annotations

import json
import os


class Tracker:
    """Logs training and evaluation records. Construct and call on EVERY rank; only the main process writes."""

    def __init__(self, accelerator, cfg, run_info: dict):
        self.accelerator = accelerator
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.use_wandb = cfg.report_to == "wandb"
        if cfg.do_train and accelerator.is_main_process and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a new training run starts a new history (--overwrite_output_dir)
        if self.use_wandb:
            wandb_kwargs = {"name": cfg.run_name}
            if not os.environ.get("WANDB_DIR"):
                wandb_kwargs["dir"] = cfg.output_dir
            accelerator.init_trackers(cfg.wandb_project, config={**cfg.to_dict(), **run_info},
                                      init_kwargs={"wandb": wandb_kwargs})

    def log(self, values: dict, step: int, prefix: str) -> None:
        """Send the numbers of `values` to the tracker as `prefix/<name>` (no-op without a tracker)."""
        numbers = {f"{prefix}/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and k not in ("epoch", "step")}
        self.accelerator.log(numbers, step=step)

    def log_eval(self, metrics: dict, epoch: int, step: int) -> dict:
        """Record a dev evaluation: a metrics.jsonl line `{"epoch", "step", "dev_<name>": ...}` (returned) and
        `dev/<name>` values for the tracker."""
        record = {"epoch": epoch, "step": step, **{f"dev_{k}": v for k, v in metrics.items()}}
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.log(metrics, step=step, prefix="dev")
        return record

    def summarize(self, values: dict) -> None:
        """Put final values (best dev accuracy, ...) in the W&B run summary."""
        if self.use_wandb and self.accelerator.is_main_process:
            self.accelerator.get_tracker("wandb", unwrap=True).summary.update(values)

    def finish(self) -> None:
        self.accelerator.end_training()
