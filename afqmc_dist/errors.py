"""Exceptions that end a run with one printed line instead of a traceback.

Exit statuses of `train.py`: 0 done; 1 training stopped on a NaN/inf loss; 2 bad input (UserError); 3 stopped
by a signal (SIGTERM/SIGUSR1/Ctrl-C) after saving a checkpoint, to be resumed with
`--resume_from_checkpoint latest`. `exit_status` maps these exceptions to those statuses for every entry point.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input. `train.py` prints it as one line and exits with status 2.

    The message must say where (file:line, or the flag) and what is wrong; no traceback is shown.
    Under several processes every rank that raises it prints its own `[rank N] error: ...` line.
    """


class TrainingStopped(Exception):
    """Training ended before its last step, on every rank at the same step; the message says why and what was
    kept. `exit_code`: 3 after a stop signal (a checkpoint was saved), 1 after a non-finite loss."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_status(run: Callable[[], None]) -> int:
    """Call `run()` (an entry point's whole work, on every rank) and return the process exit status.

    A UserError is printed as one `error:` line by every rank that raises it, prefixed with its rank under
    several processes, so an error seen by one rank only (a node-local path, say) is never silent. A
    TrainingStopped is printed once, by rank 0 (every rank stops at the same step for the same reason).
    Any other exception propagates with its traceback: it is a bug, not bad input.
    """
    rank = os.environ.get("RANK", "0")
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        run()
    except UserError as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if rank == "0":
            print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0
