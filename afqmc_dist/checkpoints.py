"""Full training checkpoints: what a killed run needs to continue as if nothing happened.

    OUTPUT_DIR/checkpoints/step_N/     accelerate's save_state (model, optimizer, scheduler, grad scaler, the RNG
                                       state of every process; files or, under FSDP/DeepSpeed, folders)
                                       + train_state.json + metrics.jsonl up to step N + checksums.sha256

`train_state.json` holds the loop's position (epoch, optimizer step), the best dev record, the early-stopping
count, the partial loss window of every process, the number of processes that wrote it, the W&B run id and the
run's fingerprint (to refuse an incompatible resume). Everything is written into `step_N.tmp`, the content hash of
every file goes into `checksums.sha256` last (manifest.py), and the folder is renamed to `step_N` only then. A
checkpoint is usable only if every file matches its hash: a save cut short, a file damaged or changed later, a
`.tmp` leftover are never resumed from. `latest` says which checkpoints it skips and why, and refuses (touching
nothing) when checkpoints exist but none is usable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field

from .distributed import first_error, on_main
from .errors import UserError
from .files import DISK_FULL, WRITE_ERRORS, free_mib, remove_quietly, replace_dir, write_error, write_json
from .manifest import manifest_problem, write_manifest
from .outputs import CHECKPOINTS, METRICS

STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class TrainState:
    """Where the training loop is. The same on every rank, except `window`, which holds one row per rank."""

    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch being trained (1-based); past the last one once training is over
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    best: dict | None = None  # the best dev record so far (see training.py)
    evals_without_improvement: int = 0
    window: list[list[float]] = field(default_factory=list)  # per rank: loss sum, pairs, real tokens, all tokens
    wandb_run_id: str | None = None
    fingerprint: dict = field(default_factory=dict)
    num_processes: int = 1  # how many processes wrote the checkpoint

    @classmethod
    def from_dict(cls, data) -> TrainState:
        """A TrainState from train_state.json's object; TypeError/ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("step", "epoch", "batches_in_epoch", "evals_without_improvement", "num_processes"):
            value = getattr(state, name)
            if type(value) is not int or value < 0:
                raise ValueError(f'"{name}" is {value!r}, not a count')
        if state.best is not None and not isinstance(state.best, dict) or not isinstance(state.fingerprint, dict):
            raise ValueError('"best" or "fingerprint" is not a JSON object')
        if not isinstance(state.window, list) or not all(
                isinstance(row, list) and len(row) == 4 and all(isinstance(v, (int, float)) for v in row)
                for row in state.window):
            raise ValueError('"window" is not a list of [loss, pairs, tokens, tokens] rows')
        return state


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def save_checkpoint(accelerator, output_dir: str, state: TrainState, keep: int | None = None) -> str:
    """Write a checkpoint of the prepared objects and `state` to OUTPUT_DIR/checkpoints/step_N. Call on EVERY rank.

    `accelerator.save_state` runs on every rank (each saves its own RNG state, and its shard under FSDP); the main
    process then adds the metrics history, train_state.json and the checksums, and renames the folder into place.
    With `keep`, only the newest `keep` checkpoints stay. If any rank's write fails (a full disk), the partial
    `.tmp` folder is removed and every rank raises the same one-line UserError; a second Ctrl-C during the save
    also removes it. Returns the checkpoint's path.
    """
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step_{state.step}")
    tmp = f"{final}.tmp"
    if accelerator.is_main_process:
        remove_quietly(tmp)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        error = None
        try:
            accelerator.save_state(tmp)
        except WRITE_ERRORS as e:
            error = write_error(tmp, e)
        error = first_error(accelerator, error)
        if error is None and accelerator.is_main_process:
            try:
                _finish(output_dir, tmp, final, state)
            except UserError as e:  # write_json's own report of a failed write
                error = str(e)
            except WRITE_ERRORS as e:
                error = write_error(tmp, e)
        error = first_error(accelerator, error)
        if error:
            raise UserError(f"cannot save the checkpoint {final}: {error}; the partial folder was removed and "
                            "the previous checkpoints are intact")
    finally:
        if accelerator.is_main_process and os.path.exists(tmp):
            remove_quietly(tmp)
    if accelerator.is_main_process and keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _finish(output_dir: str, tmp: str, final: str, state: TrainState) -> None:
    """Main process: metrics copy, train_state.json, checksums (last), then the rename into place."""
    metrics = os.path.join(output_dir, METRICS)
    if os.path.exists(metrics):
        shutil.copyfile(metrics, os.path.join(tmp, METRICS))
    write_json(os.path.join(tmp, STATE_FILE), dataclasses.asdict(state))
    write_manifest(tmp)
    replace_dir(tmp, final)


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders of OUTPUT_DIR (usable or not), oldest first; `.tmp`/`.old` leftovers excluded."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.fullmatch(name))]
    return [os.path.join(root, name) for _, name in sorted(steps)]


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a usable checkpoint (incomplete, damaged, unreadable state), or None if it is."""
    if not os.path.isdir(path):
        return "not a folder"
    problem = manifest_problem(path)
    if problem:
        return problem
    try:
        read_state(path)
    except ValueError as e:
        return f"{STATE_FILE}: {e}"
    return None


def find_latest_checkpoint(output_dir: str, say=print) -> str | None:
    """The newest usable checkpoint of OUTPUT_DIR, or None when there is no checkpoint at all.

    Each unusable one on the way is named with the reason (through `say`). When checkpoints exist but none is
    usable, raises UserError naming each: starting afresh would throw away the run they belong to.
    """
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        say(f"--resume_from_checkpoint latest: skipping {path}: {problem}")
        skipped.append(f"{os.path.basename(path)} ({problem})")
    if skipped:
        raise UserError(f"--resume_from_checkpoint latest: none of the {len(skipped)} checkpoint(s) in "
                        f"{checkpoint_root(output_dir)} is usable: {'; '.join(skipped)}. Nothing was changed: name a "
                        "checkpoint to resume from, or start a new run in another --output_dir")
    return None


def resolve_resume(cfg, accelerator) -> str | None:
    """The checkpoint --resume_from_checkpoint names ('latest': the newest usable one, None if there is none).

    Verified on the main process only (every file is hashed) and agreed on by every rank. Raises UserError for a
    named checkpoint that is not usable, or for `latest` when no checkpoint is usable.
    """
    def resolve() -> str | None:
        if cfg.resume_from_checkpoint == "latest":
            return find_latest_checkpoint(cfg.output_dir)
        path = cfg.resume_from_checkpoint
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume_from_checkpoint {path}: not a usable checkpoint: {problem}")
        return path

    return on_main(accelerator, resolve)


def read_state(path: str) -> TrainState:
    """The checkpoint's TrainState; ValueError if train_state.json is not what the tool writes."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            return TrainState.from_dict(json.load(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(str(e)) from None


def run_fingerprint(cfg, model, plan) -> dict:
    """What must not change between a run and its resumption: the options defined with `resumed`
    (RunConfig.fingerprint: the model, the data's content, how batches are drawn), the model's size and the
    global batch."""
    return {**cfg.fingerprint(), "num_parameters": model.num_parameters(), "global_batch_size": plan.global_batch}


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
    free = free_mib(path)
    if free * 2**20 < needed:
        raise UserError(f"--output_dir {path}: {free:.0f} {DISK_FULL}, but a checkpoint and the "
                        f"best model need about {needed / 2**20:.0f} MiB")
