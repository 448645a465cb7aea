"""The one exception type for mistakes a user can fix (bad flags, bad data files, missing models)."""


class UserError(Exception):
    """A problem with the user's input. `train.py` prints it as one line and exits with status 2.

    The message must say where (file:line, or the flag) and what is wrong; no traceback is shown.
    Under several processes every rank that raises it prints its own `[rank N] error: ...` line.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
