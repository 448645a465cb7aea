"""How long training runs and how the learning rate moves: epochs or --max_steps, warm-up, the scheduler.

One optimizer step trains one global batch (sampling.py). An epoch has `steps_per_epoch` of them; a run trains
`total_steps`: --max_steps when given (the last epoch may then end part-way, or more epochs than
--num_train_epochs run), else epochs x steps per epoch. The scheduler, the checkpoints and a resume all count in
these optimizer steps, whatever the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import get_scheduler

from ..errors import UserError
from ..sampling import global_batch_sizes


@dataclass(frozen=True)
class Schedule:
    batch_sizes: tuple[int, ...]  # real pairs of each global batch of an epoch (the same every epoch)
    total_steps: int
    warmup_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batch_sizes)

    @property
    def epochs(self) -> int:
        """Epochs started: the last one may end part-way under --max_steps."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_done_in_epoch(self, step: int, epoch: int) -> int:
        """Optimizer steps of `epoch` done after `step` steps in all (0 for an epoch not started yet)."""
        return max(0, min(self.steps_per_epoch, step - (epoch - 1) * self.steps_per_epoch))

    def describe(self) -> str:
        if self.total_steps == self.steps_per_epoch * self.epochs:
            return f"{self.epochs} epoch(s) of {self.steps_per_epoch} optimizer steps"
        return f"{self.total_steps} optimizer steps (--max_steps), {self.steps_per_epoch} per epoch"

    def make_scheduler(self, cfg, optimizer):
        """transformers' scheduler of --lr_scheduler_type over the run's optimizer steps."""
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=self.warmup_steps,
                             num_training_steps=self.total_steps)


def make_schedule(cfg, num_pairs: int, global_batch: int) -> Schedule:
    """The run's schedule; UserError when --dataloader_drop_last leaves no full global batch."""
    sizes = global_batch_sizes(num_pairs, global_batch, cfg.dataloader_drop_last)
    if not sizes:
        raise UserError(f"--dataloader_drop_last: the {num_pairs} training pairs do not fill one global batch "
                        f"of {global_batch}")
    total = cfg.max_steps or len(sizes) * cfg.num_train_epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_proportion * total)
    return Schedule(tuple(sizes), total, warmup)
