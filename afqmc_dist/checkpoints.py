"""Full training checkpoints: what a killed run needs to continue as if nothing happened.

    OUTPUT_DIR/checkpoints/step_N/     accelerate's save_state (model, optimizer, scheduler, grad scaler, the RNG
                                       state of every process) + train_state.json + metrics.jsonl up to step N

`train_state.json` holds the loop's position (epoch, batches consumed in it, optimizer step), the best dev
record, the early-stopping count, the partial loss window of every process, the W&B run id, the run's
fingerprint (to refuse an incompatible resume) and the size of every file of the checkpoint. It is written last,
into `step_N.tmp`, which is renamed to `step_N` only when complete: a kill during a save leaves a `.tmp` folder
that is never taken for a checkpoint, and the previous checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field

from .errors import UserError
from .outputs import METRICS, replace_dir, write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class TrainState:
    """Where the training loop is. The same on every rank, except `window`, which holds one row per rank."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch being trained (1-based); num_train_epochs + 1 once training is over
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    best: dict | None = None  # the best dev record so far (see training.py)
    evals_without_improvement: int = 0
    window: list[list[float]] = field(default_factory=list)  # per rank: loss sum, pairs, real tokens, all tokens
    wandb_run_id: str | None = None
    fingerprint: dict = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # file name -> size in bytes, for the completeness check


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def save_checkpoint(accelerator, output_dir: str, state: TrainState, keep: int | None = None) -> str:
    """Write a checkpoint of the prepared objects and `state` to OUTPUT_DIR/checkpoints/step_N. Call on EVERY rank.

    `accelerator.save_state` runs on every rank (each saves its own RNG state); the main process then adds the
    metrics history and train_state.json and renames the folder into place. With `keep`, only the newest `keep`
    checkpoints stay. Returns the checkpoint's path.
    """
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step_{state.step}")
    tmp = f"{final}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics = os.path.join(output_dir, METRICS)
        if os.path.exists(metrics):
            shutil.copyfile(metrics, os.path.join(tmp, METRICS))
        state.files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        write_json(os.path.join(tmp, STATE_FILE), dataclasses.asdict(state))
        replace_dir(tmp, final)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders of OUTPUT_DIR (complete or not), oldest first; `.tmp`/`.old` leftovers excluded."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.fullmatch(name))]
    return [os.path.join(root, name) for _, name in sorted(steps)]


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return f"no readable {STATE_FILE} (the save did not finish)"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {size} were written"
    return None


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of OUTPUT_DIR (incomplete ones are skipped), or None."""
    for path in reversed(list_checkpoints(output_dir)):
        if checkpoint_problem(path) is None:
            return path
    return None


def resolve_resume(cfg) -> str | None:
    """The checkpoint --resume_from_checkpoint names ('latest': the newest complete one, None if there is none).

    Raises UserError for a named checkpoint that is incomplete.
    """
    if cfg.resume_from_checkpoint == "latest":
        return find_latest_checkpoint(cfg.output_dir)
    path = cfg.resume_from_checkpoint
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"--resume_from_checkpoint {path}: not a complete checkpoint: {problem}")
    return path


def read_state(path: str) -> TrainState:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return TrainState(**json.load(f))


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (to tell whether a resumed run reads the same data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(cfg, model, plan) -> dict:
    """What must not change between a run and its resumption: the model, the data, and how batches are drawn."""
    return {
        "model_checkpoint": cfg.model_checkpoint,
        "head": cfg.head,
        "num_parameters": model.num_parameters(),
        "train_file": file_digest(cfg.train_file),
        "dev_file": file_digest(cfg.dev_file),
        "max_train_samples": cfg.max_train_samples,
        "max_seq_length": cfg.max_seq_length,
        "label_list": list(cfg.label_list),
        "global_batch_size": plan.global_batch,
        "seed": cfg.seed,
        "group_by_length": cfg.group_by_length,
        "length_group_size": cfg.length_group_size if cfg.group_by_length else None,
        "dataloader_drop_last": cfg.dataloader_drop_last,
        "streaming": cfg.streaming,
    }


def check_compatible(path: str, saved: dict, current: dict) -> None:
    """Refuse to resume from `path` if any fingerprint field differs, naming the first one."""
    for name, value in current.items():
        if name in saved and saved[name] != value:
            what = "content" if name.endswith("_file") else "value"
            raise UserError(f"--resume_from_checkpoint {path}: {name} differs from the checkpoint's "
                            f"({what}: {_short(saved[name])} there, {_short(value)} now); resume with the same "
                            "settings, or start a new run in another --output_dir")


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text  # file digests


def restore_metrics(accelerator, path: str, output_dir: str) -> None:
    """Put the checkpoint's copy of metrics.jsonl back (lines logged after it would be logged twice). Main only."""
    if accelerator.is_main_process:
        saved = os.path.join(path, METRICS)
        if os.path.exists(saved):
            shutil.copyfile(saved, os.path.join(output_dir, METRICS))


def estimate_checkpoint_bytes(num_parameters: int) -> int:
    """Disk needed by one checkpoint plus the best model: fp32 weights twice and AdamW's two moments."""
    return num_parameters * 4 * 4 + (64 << 20)


def check_free_space(path: str, needed: int) -> None:
    """Raise UserError if the filesystem holding `path` (or its nearest existing parent) has less than `needed`."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"--output_dir {path}: {free / 2**20:.0f} MiB free on its disk, but a checkpoint and the "
                        f"best model need about {needed / 2**20:.0f} MiB")
