"""Continuing a run from a checkpoint, exactly, on the same or on another number of processes.

Same layout (processes x accumulation): model, optimizer, scheduler, scaler, every process's RNG streams and its
partial loss window come back; the resumed run ends bit-identical to an uninterrupted one on the CPU.

Another number of processes (preempted on 8 GPUs, requeued on 4), same global batch: the data order (a function
of seed and epoch, drawn in global batches), the optimizer state and the schedule continue exactly, because they
do not depend on the layout. What cannot carry over is each process's dropout stream: a process with no RNG
state in the checkpoint starts from the seed, so dropout masks are drawn differently from there on (with dropout
0 the weights match the uninterrupted run's to rounding). The run prints the change of layout.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from accelerate.utils import RNG_STATE_NAME

from .checkpoints import TrainState, read_state, restore_metrics
from .errors import UserError
from .sampling import micro_batches_per_epoch


def load_checkpoint(accelerator, path: str, output_dir: str, schedule, plan) -> TrainState:
    """Load checkpoint `path` into the prepared objects and return the loop's state. Call on EVERY rank."""
    try:
        accelerator.load_state(path)  # weights, optimizer, scheduler, scaler, this rank's RNG streams
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--resume_from_checkpoint {path}: cannot be loaded into this run ({e})") from None
    check_rng_restored(accelerator, path)
    state = read_state(path)
    restore_metrics(accelerator, path, output_dir)
    # The position in the epoch, in this layout's micro-batches (a checkpoint is always at an optimizer step).
    done = schedule.steps_done_in_epoch(state.step, state.epoch)
    state.batches_in_epoch = micro_batches_per_epoch(schedule.batch_sizes[:done], plan.micro_batch)
    if state.num_processes != accelerator.num_processes:
        accelerator.print(f"resuming a checkpoint written by {state.num_processes} process(es) on "
                          f"{accelerator.num_processes}: the data order, optimizer and schedule continue exactly; "
                          "dropout masks are drawn differently from here on")
        # The partial loss window is a sum over processes: it moves to rank 0 whole.
        total = [sum(column) for column in zip(*state.window)] if state.window else [0.0] * 4
        state.window = [total] + [[0.0] * 4] * (accelerator.num_processes - 1)
    state.num_processes = accelerator.num_processes
    return state


def check_rng_restored(accelerator, path: str) -> None:
    """accelerate's load_state swallows any failure to restore the RNG streams (it logs at info level): then a
    'bit-exact' resume silently is not. Compare what is live now with what the file holds."""
    file = os.path.join(path, f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl")
    if not os.path.exists(file):
        return  # a process the checkpoint did not have (another layout: see load_checkpoint)
    try:
        saved = torch.load(file, weights_only=False)
        restored = (torch.equal(torch.get_rng_state(), saved["torch_manual_seed"])
                    and random.getstate() == saved["random_state"]
                    and _same_numpy_state(np.random.get_state(), saved["numpy_random_seed"]))
    except Exception as e:  # noqa: BLE001 - any unreadable content means the same: the streams are not restored
        raise UserError(f"--resume_from_checkpoint {path}: {os.path.basename(file)} cannot be read ({e}): the "
                        "random streams cannot be restored, so the resumed run would not be exact") from None
    if not restored:
        raise UserError(f"--resume_from_checkpoint {path}: the random streams in {os.path.basename(file)} were not "
                        "restored, so the resumed run would not be exact")


def _same_numpy_state(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])
