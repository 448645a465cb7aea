"""Stop requests: SIGTERM / SIGUSR1 (what SLURM and other schedulers send before a kill) and Ctrl-C.

The handler only records the signal; the training loop asks `requested()` after every optimizer step, finishes
that step, writes a checkpoint and exits. Under several processes the question is a collective (an all-reduce
over gloo, on the CPU: no GPU sync), so every rank stops at the same step even if only one got the signal.
"""

from __future__ import annotations

import signal
from typing import Self

import torch
import torch.distributed as dist

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


class StopRequests:
    """Use as a context manager around the training loop, on EVERY rank. A second Ctrl-C quits at once."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self._previous: dict = {}
        self._group = None
        if accelerator.num_processes > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a CPU side channel next to NCCL

    def __enter__(self) -> Self:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def requested(self) -> str | None:
        """The signal that asks this run to stop (on any rank), or None. Call on every rank at the same step."""
        if self.accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return (self.received or "a signal on another process") if flag.item() else None
