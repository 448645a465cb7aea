"""Stop requests: SIGTERM / SIGUSR1 (what SLURM and other schedulers send before a kill) and Ctrl-C.

Installed for the whole run, on every rank, in one of two modes:
- immediate (the default: setup, test, predict): the run stops at once with exit status 3 and one line. Nothing
  is lost: before training nothing has been written yet, and every output file is written atomically.
- deferred (`with stop_requests.deferred():` around training): the handler only records the signal; the training
  loop asks `requested()` after every optimizer step, finishes that step, writes a checkpoint and exits 3. Under
  several processes the question is a collective (an all-reduce over gloo, on the CPU: no GPU sync), so every
  rank stops at the same step even if only one got the signal.
A second Ctrl-C quits at once (KeyboardInterrupt: exit status 130, one line, temporary files removed).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Self

import torch
import torch.distributed as dist

from .errors import EXIT_STOPPED, TrainingStopped

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


class StopRequests:
    """Use as a context manager around a whole run, on EVERY rank; `attach` the accelerator once it exists."""

    def __init__(self, accelerator=None):
        self.accelerator = None
        self.received: str | None = None
        self.defer = False
        self._previous: dict = {}
        self._group = None
        if accelerator is not None:
            self.attach(accelerator)

    def attach(self, accelerator) -> None:
        """Call on every rank right after the Accelerator is made (creating the side group is a collective)."""
        self.accelerator = accelerator
        if accelerator.num_processes > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a CPU side channel next to NCCL

    def __enter__(self) -> Self:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextmanager
    def deferred(self):
        """Within the block a signal is only recorded (see `requested`); outside it, it stops the run at once."""
        self.defer = True
        try:
            yield self
        finally:
            self.defer = False

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if not self.defer:
            raise TrainingStopped(f"{self.received} received: stopped at once (no training was under way, so there "
                                  "is no checkpoint to save, and nothing was left half-written)",
                                  exit_code=EXIT_STOPPED)

    def requested(self) -> str | None:
        """The signal that asks this run to stop (on any rank), or None. Call on every rank at the same step."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return (self.received or "a signal on another process") if flag.item() else None
