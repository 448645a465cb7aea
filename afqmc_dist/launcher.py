"""`accelerate launch` with the tool's own ending: its line, last, and its exit status.

    python -m afqmc_dist.launcher <accelerate launch arguments> train.py ARGS

Every script in launch/ runs this instead of `accelerate launch`. The launching itself is accelerate's
(`launch_command`, called in this process); around it the launcher:

- gives the processes a status folder (`$AFQMC_STATUS_DIR`, see errors.py): each writes `rank<N>.json` when it
  ends and leaves the printing to the launcher;
- catches what accelerate raises when a process fails (`CalledProcessError` from its single-process launcher,
  torch elastic's `ChildFailedError` from the multi-process one) and silences torch elastic's logging, so that
  no traceback reaches the screen;
- prints the tool's line once, last on stderr, and exits with the tool's status (`verdict` says which): 0 done,
  1 NaN stop, 2 bad input, 3 stopped by a signal, 4 unexpected error, 5 pruned, 130 second Ctrl-C. A process
  that ended without a status file (SIGKILL, a segfault, a crash before the tool started) gives 4 and a line
  naming its rank and how it ended; one that a stop signal passed on by the launcher ended gives 3. A launch
  accelerate refuses before starting anything (e.g. --multi_gpu with 1 process) gives 2.
- passes SIGTERM, SIGUSR1 and SIGINT (what SLURM, a job script or Ctrl-C send) on to the training processes,
  which finish their step, save a checkpoint and exit 3 (preemption.py); SIGHUP and SIGQUIT too, so that no
  process is left behind. Why here: accelerate's single-process launcher forwards nothing, and torch elastic's
  agent (the multi-process one) forwards SIGTERM/SIGINT but not SIGUSR1. torch installs its handlers only when
  the agent runs in the main thread, so the launch runs in a helper thread and the main thread keeps every
  signal (torch's `SignalException` cannot occur). The processes then take as long as their checkpoint needs:
  the limit is whoever sent the signal (SLURM's KillWait, see slurm.sbatch). torch still gives the others 30 s
  once the first process has exited; the tool's processes leave its checkpoint barrier together.

`--quiet` is accepted and changes nothing: the launcher never shows a launch traceback, and it needs the exit
code that accelerate's quiet path replaces by 1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Self

from .errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_STOPPED,
    STATUS_DIR_ENV,
    UserError,
    first_line,
    outcome,
    stop_while_starting,
)
from .preemption import handling

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORWARDED = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGQUIT)
# torch elastic logs every worker failure and shutdown step (errors and warnings, with tracebacks).
QUIET_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
POLL_SECONDS = 0.1


def free_port() -> int:
    """A TCP port nothing listens on now: a launch's rendezvous ($MAIN_PROCESS_PORT), unique among local runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Record:
    """One process's status file: how it ended (errors.py writes it) and when (the file's mtime)."""

    rank: int
    status: int
    line: str | None
    written_ns: int


def read_records(folder: str) -> dict[int, Record]:
    """The status files in FOLDER by rank (unreadable or half-written files are skipped: they count as missing)."""
    records = {}
    for name in os.listdir(folder):
        if not (name.startswith("rank") and name.endswith(".json")):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            record = Record(int(data["rank"]), int(data["status"]), data["line"], os.stat(path).st_mtime_ns)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        records[record.rank] = record
    return records


def verdict(records: dict[int, Record], exits: dict[int, int],
            forwarded: tuple[signal.Signals, ...] = ()) -> tuple[int, list[str]]:
    """The launch's exit status and the lines to print, the tool's own line last ([] when there is nothing to say).

    records: the status files by rank. exits: the exit codes the launcher saw, by rank (negative: killed by that
    signal); ranks missing from it ended with 0 or are unknown. forwarded: the signals the launcher passed on.

    - Some process recorded a non-zero status: the FIRST one written wins (ties: the lowest rank). When one rank
      fails, torch stops the others, whose own failures follow from it and are written later. A record without
      a line (ranks other than 0 after a stop: rank 0 says it) takes the line of a record with the same status.
      Except: when every recorded failure is an unexpected error (4) and a process was killed by a signal nobody
      in the launch sent (kill -9, the OOM killer), that death broke the others' collectives: it is the line.
    - Else some process ended non-zero without a record: 3 if a stop signal the launcher passed on ended it
      (before or after the training loop, which would have taken the stop), else 4. A death by SIGTERM (what torch
      sends to the other processes when one fails) is chosen only when there is no other.
    - Else 0.
    Every other process that died without a record, by a signal nobody in the launch sent (SIGKILL from the
    kernel's OOM killer, SIGSEGV, ...) or with a bare exit code, is named on a line of its own before the last.
    """
    explained = (-signal.SIGTERM, *(-sig for sig in forwarded))  # torch's stop of the others, or the launcher's
    dead = {rank: code for rank, code in exits.items() if code != 0 and rank not in records}
    killed = {rank: code for rank, code in dead.items() if code < 0 and code not in explained}
    failed = sorted((r for r in records.values() if r.status != EXIT_OK), key=lambda r: (r.written_ns, r.rank))
    if failed and not (killed and all(r.status == EXIT_INTERNAL for r in failed)):
        first, chosen = failed[0], None
        worded = [r.line for r in sorted(records.values(), key=lambda r: r.rank) if r.status == first.status and r.line]
        status = first.status
        line = first.line or next(iter(worded), f"error: rank {first.rank} ended with status {first.status}")
    elif dead:
        chosen = min(killed or dead, key=lambda r: (dead[r] == -signal.SIGTERM, r))
        status, line = _death(chosen, dead[chosen], forwarded)
    else:
        return EXIT_OK, []
    notes = [_death(rank, code, ())[1] for rank, code in sorted(dead.items())
             if rank != chosen and code not in explained]
    return status, [*notes, line]


def _death(rank: int, code: int, forwarded: tuple[signal.Signals, ...]) -> tuple[int, str]:
    """Status and line for a process that ended with CODE without a status record."""
    if code < 0 and -code in forwarded and -code in STOP_SIGNALS:
        return EXIT_STOPPED, (f"stopped: {signal.Signals(-code).name} ended rank {rank} outside the training loop, "
                              "so this stop saved no checkpoint")
    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
    return EXIT_INTERNAL, f"error: rank {rank} {how} without reporting why (any message of its own is above)"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Forwarder:
    """Passes the signals this process receives on to its child processes (the training processes).

    The handler only records; `deliver()` (called by the main loop) sends each recorded signal once to every
    child, including children started after it came. A Ctrl-C in a terminal already reaches every process of
    the foreground process group: a child in it when the SIGINT came is not sent a second one (two SIGINTs mean
    "quit at once, without saving" to the tool).
    """

    def __init__(self, signals=FORWARDED):
        self.signals = signals
        self.received: list[tuple[signal.Signals, set[int]]] = []  # (signal, children the terminal reached)
        self._sent: dict[int, int] = {}  # child pid -> how many of `received` it has been given
        self._handlers = ExitStack()

    def __enter__(self) -> Self:
        # nohup, or a background job of a script: a signal ignored here stays ignored.
        self._handlers.enter_context(handling(self.signals, self._record, keep_ignored=True))
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.close()

    def _record(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        reached = set()
        if sig == signal.SIGINT and (group := _terminal_foreground_group()) is not None:
            reached = {pid for pid in _children() if _process_group(pid) == group}
        self.received.append((sig, reached))

    @property
    def forwarded(self) -> tuple[signal.Signals, ...]:
        return tuple(sig for sig, _ in self.received)

    def deliver(self) -> None:
        received = list(self.received)
        for pid in _children():
            for sig, reached in received[self._sent.get(pid, 0):]:
                if pid not in reached:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        break
            self._sent[pid] = len(received)


def _children() -> list[int]:
    import psutil  # an accelerate dependency

    return [child.pid for child in psutil.Process().children()]


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _terminal_foreground_group() -> int | None:
    """The process group a Ctrl-C on this process's controlling terminal goes to; None without a terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return None
    try:
        return os.tcgetpgrp(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _launch_in_thread(args, forwarder: Forwarder) -> BaseException | None:
    """Run accelerate's `launch_command(args)` in a helper thread while this (main) thread forwards signals;
    return what it raised, or None."""
    from accelerate.commands.launch import launch_command

    raised: list[BaseException] = []

    def target():
        try:
            launch_command(args)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which decides
            raised.append(e)

    thread = threading.Thread(target=target, name="accelerate-launch", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_SECONDS)
        forwarder.deliver()
    return raised[0] if raised else None


def _exit_codes(raised: BaseException | None) -> dict[int, int]:
    """The processes' exit codes (by rank) that accelerate's exception carries; {} when they all ended with 0.
    Raises UserError for a launch accelerate refused before starting anything, and re-raises anything else."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if raised is None:
        return {}
    if isinstance(raised, subprocess.CalledProcessError):  # the single-process launcher
        return {0: raised.returncode}
    if isinstance(raised, ChildFailedError):  # torch elastic (multi-process); negative codes are signals
        return {rank: failure.exitcode for rank, failure in raised.failures.items()}
    if isinstance(raised, SystemExit) and isinstance(raised.code, int):
        return {0: raised.code} if raised.code else {}
    if isinstance(raised, ValueError):  # _validate_launch_command: e.g. --multi_gpu with 1 process
        raise UserError(f"accelerate launch: {first_line(raised)}") from None
    raise raised


def _one_line_error(message: str):
    """argparse's error, as the tool's: one line (a UserError), not the 100-line usage of accelerate launch."""
    raise UserError(f"accelerate launch: {message} (see accelerate launch --help)")


def check_launch_arguments(args) -> None:
    """What accelerate would only find out after it started (or would report with a traceback): the config file
    must load with accelerate's own reader, and the number of processes must be a count."""
    from accelerate.commands.config.config_args import load_config_from_file

    if args.config_file is not None:
        try:
            load_config_from_file(args.config_file)
        except FileNotFoundError:
            raise UserError(f"--config_file {args.config_file}: no such file") from None
        except Exception as e:  # noqa: BLE001 - YAML/JSON errors, unknown keys (ValueError), wrong types
            raise UserError(f"--config_file {args.config_file}: not an accelerate config ({first_line(e)})") from None
    if args.num_processes is not None and args.num_processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {args.num_processes}")


def launch(argv: list[str]) -> tuple[int, list[str]]:
    """Parse accelerate launch ARGV, run the launch, and return (exit status, lines to print: see `verdict`)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.prog = "python -m afqmc_dist.launcher"
    parser.error = _one_line_error
    args = parser.parse_args(argv)
    check_launch_arguments(args)
    args.quiet = False  # see the module docstring
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.addHandler(logging.NullHandler())

    previous = os.environ.get(STATUS_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="afqmc-status-") as folder, Forwarder() as forwarder:
        os.environ[STATUS_DIR_ENV] = folder  # the processes inherit the launcher's environment
        try:
            raised = _launch_in_thread(args, forwarder)
        finally:
            if previous is None:
                os.environ.pop(STATUS_DIR_ENV, None)
            else:
                os.environ[STATUS_DIR_ENV] = previous
        exits = _exit_codes(raised)
        records = read_records(folder)
    status, lines = verdict(records, exits, forwarder.forwarded)
    if any(code != 0 and rank not in records for rank, code in exits.items()):
        lines = ["", *lines]  # a process killed in mid-line (its progress bar) left the cursor there
    return status, lines


def main(argv: list[str] | None = None) -> int:
    """Launch, print the tool's line (once, last on stderr) and return the tool's exit status."""
    previous = stop_while_starting()  # accelerate and torch take seconds to import: a stop signal then is a line too
    result: list[tuple[int, list[str]]] = []
    try:
        status, line = outcome(lambda: result.append(launch(sys.argv[1:] if argv is None else argv)))
    finally:  # called in-process (tests): the caller's handlers come back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    lines = [line] if line else []
    if result:
        status, lines = result[0]
    if lines:
        print("\n".join(lines), file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
