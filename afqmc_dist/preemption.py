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

import atexit
import inspect
import signal
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from typing import Self

from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    exit_status,
    log_errors_to,
    outside_imports,
    signals_taken_over,
    stop_at_once,
    stop_while_starting,
)

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


@contextmanager
def handling(signals: Iterable[int], handler, keep_ignored: bool = False):
    """`handler` for each of `signals` within the block, the previous handlers back after it. With
    `keep_ignored`, a signal this process ignores (started with nohup, or as a script's background job) stays
    ignored."""
    previous = {}
    try:
        for sig in signals:
            if not (keep_ignored and signal.getsignal(sig) is signal.SIG_IGN):
                previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequests:
    """Use as a context manager around a whole run, on EVERY rank; `attach` the accelerator once it exists."""

    def __init__(self, accelerator=None):
        self.accelerator = None
        self.received: str | None = None
        self.defer = False
        self.kept = "no training was under way, so there is no checkpoint to save, and nothing was left half-written"
        self._handlers = ExitStack()
        self._group = None
        if accelerator is not None:
            self.attach(accelerator)

    def attach(self, accelerator) -> None:
        """Call on every rank right after the Accelerator is made (creating the side group is a collective)."""
        import torch.distributed as dist

        self.accelerator = accelerator
        if accelerator.num_processes > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a CPU side channel next to NCCL

    def __enter__(self) -> Self:
        signals_taken_over()
        self._handlers.enter_context(handling(STOP_SIGNALS, outside_imports(self._handle)))
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.close()

    @contextmanager
    def deferred(self):
        """Within the block a signal is only recorded (see `requested`); outside it, it stops the run at once."""
        self.defer = True
        try:
            yield self
        finally:
            self.defer = False

    @contextmanager
    def keeping(self, what: str):
        """Within the block, a stop at once ends its line with `what` (what is kept, how to go on)."""
        previous, self.kept = self.kept, what
        try:
            yield self
        finally:
            self.kept = previous

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if not self.defer:
            stop_at_once(signum, self.kept)

    def requested(self) -> str | None:
        """The signal that asks this run to stop (on any rank), or None. Call on every rank at the same step."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return self.received
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return (self.received or "a signal on another process") if flag.item() else None


def run_command(work: Callable) -> int:
    """What every command's `main` does: stop signals handled from the first moment (one line, status 3, never a
    traceback or a bare 143), the work done under the run's own stop handling (`work(stop_requests)`, or `work()`
    for a command that only stops at once: temporary files are removed on the way out), and the exit status of
    how it ended (errors.exit_status). Call it before any heavy import: a command's module imports only what
    checking its flags needs."""
    previous = stop_while_starting()
    log_errors_to(None)  # until the command knows its output folder
    takes_requests = bool(inspect.signature(work).parameters)

    def whole() -> None:
        with StopRequests() as stop_requests:
            work(stop_requests) if takes_requests else work()

    status = EXIT_INTERNAL
    try:
        status = exit_status(whole)
        return status
    finally:  # called in-process (tests): the caller's handlers come back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if status in (EXIT_STOPPED, EXIT_INTERRUPTED):
            # A stopped command is on its way out; one more Ctrl-C (a terminal's, and the launcher's forwarded
            # copy, reach each process) would raise KeyboardInterrupt inside the interpreter's exit callbacks
            # (tqdm's, weakref finalizers': a traceback after the one line). Registered last, this runs first.
            atexit.register(_ignore_stop_signals)


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
