"""Exceptions that end a run with one printed line instead of a traceback.

Exit statuses of `train.py`: 0 done; 1 training stopped on a NaN/inf loss; 2 bad input (UserError); 3 stopped
by a signal (SIGTERM/SIGUSR1/Ctrl-C) after saving a checkpoint, to be resumed with
`--resume_from_checkpoint latest`.
"""


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
