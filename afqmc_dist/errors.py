"""How every entry point ends: one line and an exit status, never a traceback on the screen.

Exit statuses (the same for `train.py`, `afqmc_dist.predict`, `report`, `download`, `sweep` and every script in
`launch/`):

    0    done
    1    training stopped on a NaN/inf loss (checkpoints and best/ from before it are kept)
    2    bad input: a flag, a file, a model folder (UserError), found before anything was written
    3    stopped by a signal (SIGTERM / SIGUSR1 / Ctrl-C); once training has started a checkpoint was saved:
         continue with --resume_from_checkpoint latest
    4    an unexpected error (a bug, or a failure of the machine): one line on the screen, the traceback in
         OUTPUT_DIR/error.log
    5    pruned: a sweep trial whose dev metric fell below the pruner's bar (see sweep.py)
    130  interrupted by Ctrl-C where it cannot be deferred (a second one during training): stopped at once, no
         checkpoint

`exit_status` maps exceptions to those statuses. Under `afqmc_dist.launcher` (what the launch scripts use) each
process also records its status and line in `$AFQMC_STATUS_DIR/rank<N>.json` and leaves the printing to the
launcher, which prints the line once, last, and exits with the tool's own status.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable

EXIT_OK, EXIT_NONFINITE, EXIT_USER, EXIT_STOPPED, EXIT_INTERNAL, EXIT_PRUNED = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
STATUS_DIR_ENV = "AFQMC_STATUS_DIR"
ERROR_LOG = "error.log"


class UserError(Exception):
    """A problem with the user's input, printed as one line (`error: ...`), exit status 2.

    The message must say where (file:line, or the flag) and what is wrong; no traceback is shown.
    Under several processes every rank that raises it prints its own `[rank N] error: ...` line.
    """


class CommandParser(argparse.ArgumentParser):
    """argparse for the tool's commands: a bad flag is one `error: ...` line (a UserError) like every other
    error, not the usage followed by a message (--help still shows the usage)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a prefix of a flag is a typo, not a flag
        super().__init__(**kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


class TrainingStopped(BaseException):
    """Training ended before its last step, on every rank at the same step; the message says why and what was
    kept. `exit_code`: EXIT_STOPPED after a stop signal, EXIT_NONFINITE after a non-finite loss, EXIT_PRUNED for
    a pruned sweep trial.

    A BaseException, as KeyboardInterrupt is: a stop signal can raise it anywhere (during an import, inside a
    library call), and a library's `except Exception` must not turn it into some other error or swallow it."""

    def __init__(self, message: str, exit_code: int = EXIT_NONFINITE):
        super().__init__(message)
        self.exit_code = exit_code


_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):[^\s@/]+@")


def mask_secrets(text: str) -> str:
    """`text` with the password of every URL in it (`scheme://user:PASSWORD@host`) replaced by `***`: for every
    command line or message the tool records (error.log, the lock's holder file, a sweep's logs)."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def closest_option(name: str, options: list[str]) -> str:
    """' (did you mean --x?)' for the option closest to a mistyped one, or ''."""
    import difflib

    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_log_dir: str | None = None
_taken_over = False  # the run handles stop signals itself now (see stop_while_starting)


def log_errors_to(folder: str | None) -> None:
    """Where the traceback of an unexpected error goes (`folder/error.log`): each entry point calls this as soon
    as it knows its output folder. Without one (or if it cannot be written), a file in the temp folder."""
    global _log_dir
    _log_dir = folder


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _write_traceback() -> str:
    """Write the current exception's traceback to the error log; return the log's path (or why it could not)."""
    name = ERROR_LOG if _rank() == 0 else f"error.rank{_rank()}.log"
    text = "".join(traceback.format_exc())
    for folder in (_log_dir, tempfile.gettempdir()):
        if not folder or not os.path.isdir(folder):
            continue
        path = os.path.join(folder, name if folder == _log_dir else f"afqmc_dist-{os.getpid()}-{name}")
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(mask_secrets(f"command: {' '.join(sys.argv)}\n\n{text}"))
            return path
        except OSError:  # a full disk: no empty or cut-short log left behind, the next folder is tried
            try:
                os.remove(path)
            except OSError:
                pass
    return "nowhere: no folder could be written"


def outcome(run: Callable[[], None]) -> tuple[int, str | None]:
    """Run `run()` and return (exit status, the line to print or None; never a password: see mask_secrets)."""
    status, line = _outcome(run)
    return status, mask_secrets(line) if line else line


def _outcome(run: Callable[[], None]) -> tuple[int, str | None]:
    prefix = f"[rank {_rank()}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    try:
        run()
    except UserError as e:
        return EXIT_USER, f"{prefix}error: {e}"
    except TrainingStopped as e:
        # Every rank stops at the same step for the same reason: rank 0 says it.
        return e.exit_code, f"stopped: {e}" if _rank() == 0 else None
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, f"{prefix}error: interrupted (Ctrl-C): stopped at once, without saving"
    except Exception as e:  # noqa: BLE001 - the whole point: no traceback on the screen, the details in a file
        where = _write_traceback()
        return EXIT_INTERNAL, f"{prefix}error: unexpected {type(e).__name__}: {first_line(e)} (details in {where})"
    return EXIT_OK, None


def stop_at_once(signum: int, what: str) -> None:
    """End the command for stop signal `signum`, with status 3 and one line:
    TrainingStopped is raised, so that the temporary files of a write are removed on the way out (files.py) and
    the command's own clean-up runs. `what` ends the line: what was kept. Call it from a handler wrapped in
    `outside_imports`."""
    raise TrainingStopped(f"{signal_name(signum)} received: stopped at once ({what})", exit_code=EXIT_STOPPED)


def outside_imports(handler: Callable) -> Callable:
    """`handler` (a stop-signal handler) run only when the main thread is not loading a module.

    An exception raised in a module's body leaves it half-imported, and a later import fails in its place (numpy,
    for one, then recurses without end); and imports are everywhere: torch, transformers and matplotlib take
    seconds at start-up, tqdm, transformers' model classes and others load lazily later. So a signal that comes
    during an import waits for it to end and is delivered again then (`_AfterImport`), to whatever handles it
    by then. A second stop signal while it waits ends the process at once, a way out of an import that hangs."""

    def handle(signum, frame):
        module = _loading_module(frame)
        redelivered, _after_import.redelivering = _after_import.redelivering, False
        if module is None:
            _after_import.waiting = None
            return handler(signum, frame)
        if _after_import.waiting is None or redelivered:
            _after_import.wait(signum)
            return None
        _end_now(f"stopped: {signal_name(signum)} received again while Python was loading {module}: ended at "
                 f"once, without saving or cleaning up")

    return handle


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _end_now(line: str) -> None:
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if not (status_dir and _record_status(status_dir, EXIT_STOPPED, line)):
        print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_STOPPED)


class _AfterImport:
    """Delivers a stop signal that came during an import again once the main thread has left every import: a
    thread looks at the main thread's frames every few milliseconds, then signals it (pthread_kill)."""

    POLL_SECONDS = 0.005

    def __init__(self):
        self.waiting: int | None = None  # the signal waiting for an import to end
        self.redelivering = False  # the next stop signal is that copy, not a second one from outside

    def wait(self, signum: int) -> None:
        import threading

        self.waiting = signum
        threading.Thread(target=self._deliver_after_import, args=(signum, threading.main_thread().ident),
                         daemon=True, name="stop-signal-after-import").start()

    def _deliver_after_import(self, signum: int, main: int) -> None:
        import signal
        import time

        while (frame := sys._current_frames().get(main)) is not None and _loading_module(frame) is not None:
            time.sleep(self.POLL_SECONDS)
        if frame is not None and self.waiting == signum:
            self.redelivering = True
            signal.pthread_kill(main, signum)


_after_import = _AfterImport()


def _loading_module(frame) -> str | None:
    """The module whose body `frame` runs in, inside an import statement, or None. (A module compiled in C, such
    as termios, runs no body: the signal is handled once it is loaded, and raising then is safe.)"""
    module = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and not frame.f_code.co_filename.startswith("<"):
            module = module or frame.f_globals.get("__name__")
        elif module and frame.f_code.co_filename.startswith("<frozen importlib"):
            return module
        frame = frame.f_back
    return None


def stop_while_starting(signals=("SIGTERM", "SIGUSR1", "SIGINT")) -> dict:
    """Until the run installs its own handlers (preemption.StopRequests), a stop signal (while Python is still
    importing torch and transformers, say: once that import is over, see `outside_imports`) ends the process
    with one line and status 3 (`stop_at_once`), not a traceback or a bare 143. Every command calls this first,
    before its heavy imports. Returns the handlers it replaced (signal -> handler), for a caller that runs in a
    process of its own making (a test) to put back."""
    import signal

    def stopped(signum, frame):
        if _taken_over:
            # The run handles stop signals itself (preemption.py) and puts this handler back when it ends: a
            # signal now (torchrun stopping the survivors of a failed process) must not replace its status.
            return
        stop_at_once(signum, "nothing was left half-written")

    return {getattr(signal, name): signal.signal(getattr(signal, name), outside_imports(stopped))
            for name in signals if hasattr(signal, name)}


def signals_taken_over() -> None:
    """Called when the run installs its own stop-signal handlers: from then on `stop_while_starting`'s handler,
    which they put back when they end, ignores stop signals."""
    global _taken_over
    _taken_over = True


def exit_status(run: Callable[[], None]) -> int:
    """Call `run()` (an entry point's whole work, on every rank) and return the process exit status.

    A UserError is printed as one `error:` line by every rank that raises it, prefixed with its rank under
    several processes, so an error seen by one rank only (a node-local path, say) is never silent. A
    TrainingStopped is printed once, by rank 0. Anything else is printed as one line naming the error and the
    file holding its traceback. Under the project's launcher ($AFQMC_STATUS_DIR set), the status and line are
    written to the status folder instead, for the launcher to print once.
    """
    status, line = outcome(run)
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if status_dir and _record_status(status_dir, status, line):
        return status
    if line:
        print(line, file=sys.stderr, flush=True)
    return status


def _record_status(folder: str, status: int, line: str | None) -> bool:
    """Write this rank's outcome to FOLDER/rank<N>.json (atomically); False if that is impossible."""
    path = os.path.join(folder, f"rank{_rank()}.json")
    try:
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            json.dump({"rank": _rank(), "status": status, "line": line}, f)
        os.replace(f"{path}.tmp", path)
    except OSError:
        return False
    return True
