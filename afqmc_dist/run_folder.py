"""The output folder of a run: one run at a time, a replaced run never lost, and where a resumed run continues.

One run per folder. The main process holds OUTPUT_DIR/.afqmc.lock (filelock: an flock(2) lock, released by the
kernel when its process dies, however it dies) for the whole life of a run that writes there, and says who it
is in OUTPUT_DIR/.afqmc.lock.json (host, process id, start time, command). A second run on a held folder (a
retried job whose first attempt is in fact still running) stops before touching anything and names the holder. A
lock whose holder was killed is free again; the next run takes it and says whose it was. Across nodes the lock is
as good as the shared filesystem's flock: NFSv4 and Lustre (mounted with `flock`) pass it to the server; on a
filesystem without lock support filelock falls back to a lock file whose existence is the lock, which a killed
run leaves behind (remove OUTPUT_DIR/.afqmc.lock by hand once you are sure no run uses the folder).

A replaced run is set aside, never deleted. A fresh training run with --overwrite_output_dir in a folder that
holds another run moves that run's outputs into OUTPUT_DIR/.previous-run/ (renames only). They stay there until
the new run saves its first best model, and are put back if it fails before (`SetAside.guard`: every failure
after the set-aside, whatever raised it). A run stopped by a signal keeps the set-aside: its checkpoint is resumed
with --resume_from_checkpoint latest. A .previous-run/ that is still there when a run starts (a run killed with
SIGKILL, or a removal that failed: a busy file on NFS, a mount) is refused, never replaced: it is the only copy of
a run. Get it back with `python -m afqmc_dist.restore OUTPUT_DIR`, or remove it by hand to let a new run replace it.

Where a training run starts (`resume_point`): a named checkpoint; with `latest`, the newest usable checkpoint, or
a fresh start only when the folder holds no other run (no best model, no results, nothing set aside) unless
--overwrite_output_dir says to replace it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from typing import ClassVar

from filelock import FileLock, Timeout

from .errors import UserError, mask_secrets
from .files import remove_quietly
from .outputs import BEST_DIR, CHECKPOINTS, RESULTS, run_outputs

LOCK_FILE, HOLDER_FILE = ".afqmc.lock", ".afqmc.lock.json"
PREVIOUS_RUN = ".previous-run"
RESTORE_COMMAND = "python -m afqmc_dist.restore"


# --- one run at a time ------------------------------------------------------------------------------------------

class RunLock:
    """The lock of one output folder. `acquire` on the main process only (see cli.py); `release` at the end."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.holder_path = os.path.join(output_dir, HOLDER_FILE)
        self._lock = FileLock(os.path.join(output_dir, LOCK_FILE), timeout=0)

    def acquire(self, say=print) -> None:
        """Take the lock (creating OUTPUT_DIR if needed) or raise UserError naming the run that holds it."""
        created = not os.path.isdir(self.output_dir)
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            raise UserError(f"--output_dir {self.output_dir} is in use by another run ({self._describe_holder()}); "
                            "wait for it to end, or use another --output_dir") from None
        except OSError as e:
            if created:
                _remove_empty(self.output_dir)
            raise UserError(f"--output_dir {self.output_dir}: cannot lock it ({e.strerror or e})") from None
        previous = _read_json(self.holder_path)
        if previous:
            say(f"{self.output_dir}: taking over the lock of a run that ended without releasing it "
                f"({_describe(previous)})")
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": mask_secrets(" ".join(sys.argv))}
        tmp = f"{self.holder_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(holder, f, ensure_ascii=False)
            os.replace(tmp, self.holder_path)
        except OSError as e:
            remove_quietly(tmp)
            self._lock.release()
            raise UserError(f"--output_dir {self.output_dir}: cannot record who holds its lock in {self.holder_path} "
                            f"({e.strerror or e}); remove or rename what is there") from None

    def release(self) -> None:
        if self._lock.is_locked:
            try:
                os.remove(self.holder_path)
            except OSError:
                pass
            self._lock.release()

    def _describe_holder(self) -> str:
        holder = _read_json(self.holder_path)
        return _describe(holder) if holder else "its holder did not say who it is"


def _describe(holder: dict) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    where = f"process {pid} on {host}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        where += " (no longer running)"
    return f"{where}, started {holder.get('started')}: {holder.get('command')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Remove what a crashed save left behind (`best.tmp/`, `checkpoints/step_N.tmp/`, `*.tmp` files). Call while
    holding the folder's lock: no other run can be writing them. Returns the paths removed."""
    folders = [output_dir, os.path.join(output_dir, CHECKPOINTS)]
    stale = [os.path.join(folder, name) for folder in folders if os.path.isdir(folder)
             for name in sorted(os.listdir(folder)) if name.endswith((".tmp", ".old")) and name != f"{BEST_DIR}.old"]
    for path in stale:
        remove_quietly(path)
    return stale


def find_best_dir(output_dir: str) -> str:
    """The best-model folder of `output_dir` (or its previous version if a crash hit mid-replace); UserError when
    there is none, saying where a set-aside run's model is if there is one."""
    best = os.path.join(output_dir, BEST_DIR)
    if os.path.isdir(best) or not os.path.isdir(f"{best}.old"):
        if not os.path.isdir(best) and SetAside(output_dir).exists():
            raise UserError(SetAside(output_dir).refusal(f"{best}: no trained model here"))
        return best
    return f"{best}.old"


# --- a replaced run, set aside --------------------------------------------------------------------------------

class SetAside:
    """OUTPUT_DIR/.previous-run: the outputs of a run that a fresh --overwrite_output_dir run replaces. The main
    process moves, restores and removes it; every method but `guard` is for the main process only."""

    _reported: ClassVar[set[str]] = set()  # folders whose failed removal was already said (once per process is enough)

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, PREVIOUS_RUN)

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def refusal(self, what: str) -> str:
        """The line that refuses `what` while a run waits in .previous-run/: what it holds, how to get it back."""
        try:
            names = sorted(os.listdir(self.path))
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.stat(self.path).st_mtime))
        except OSError:
            names, when = [], "an unknown date"
        held = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") if names else "nothing readable"
        return (f"{what}: {self.path} holds a run's outputs ({held}), set aside on {when} by an "
                "--overwrite_output_dir run that did not finish replacing it; get that run back with "
                f"`{RESTORE_COMMAND} {self.output_dir}`, or remove {self.path} to let a new run replace it")

    def move_aside(self) -> list[str]:
        """Move the run in OUTPUT_DIR into .previous-run/ (renames only); return the names moved. UserError if a
        run is set aside already: it is never deleted to make room."""
        if self.exists():
            raise UserError(self.refusal("--overwrite_output_dir"))
        names = run_outputs(self.output_dir)
        if names:
            os.makedirs(self.path)
            for name in names:
                os.replace(os.path.join(self.output_dir, name), os.path.join(self.path, name))
        return names

    def restore(self) -> list[str]:
        """Remove the outputs of the run that replaced it (it has no best model of its own), then move the
        set-aside run back; return the names put back. OSError if a file cannot be moved."""
        for name in run_outputs(self.output_dir):
            path = os.path.join(self.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        names = sorted(os.listdir(self.path))
        for name in names:
            os.replace(os.path.join(self.path, name), os.path.join(self.output_dir, name))
        os.rmdir(self.path)
        return names

    def discard(self) -> None:
        """The new run has a best model of its own: remove the set-aside run. A removal that fails is said in one
        line (the next run will refuse the leftover until it is removed by hand), never ignored."""
        if not self.exists():
            return
        failures = []

        def failed(_function, path, error) -> None:  # `error`: an exception (onexc) or exc_info (onerror)
            failures.append((path, error[1] if isinstance(error, tuple) else error))

        # Python 3.12 renamed onerror (deprecated there) to onexc.
        shutil.rmtree(self.path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": failed})
        if failures and self.path not in self._reported:
            self._reported.add(self.path)
            path, error = failures[0]
            print(f"could not remove {self.path}, the run this one replaced ({path}: "
                  f"{getattr(error, 'strerror', None) or error}); this run is complete: remove {self.path} by hand "
                  "before the next --overwrite_output_dir", flush=True)

    def guard(self, accelerator, fresh: bool):
        """A context for everything a fresh run does after it takes its folder: on entry the previous run is set
        aside (with `fresh`), and any failure inside puts it back, except a stop signal, whose checkpoint is
        this run's to resume. Call on every rank; only the main process moves files."""
        return _Guard(self, accelerator, fresh)


class _Guard:
    def __init__(self, aside: SetAside, accelerator, fresh: bool):
        self.aside, self.accelerator, self.fresh = aside, accelerator, fresh

    def __enter__(self) -> SetAside:
        from .distributed import on_main

        if self.fresh:
            moved = on_main(self.accelerator, self.aside.move_aside)
            if moved:
                self.accelerator.print(f"--overwrite_output_dir: the previous run's outputs ({', '.join(moved)}) "
                                       f"are kept in {self.aside.path} until this run saves its first best model")
        return self.aside

    def __exit__(self, kind, error, traceback) -> None:
        from .errors import EXIT_STOPPED, TrainingStopped

        if error is None or not self.accelerator.is_main_process or not self.aside.exists():
            return
        if os.path.isdir(os.path.join(self.aside.output_dir, BEST_DIR)):
            return  # this run has a best model: the set-aside one is only a leftover its removal could not remove
        if isinstance(error, TrainingStopped) and error.exit_code == EXIT_STOPPED:
            print(f"the previous run stays in {self.aside.path} until this run, continued with "
                  "--resume_from_checkpoint latest, saves its first best model", flush=True)
            return
        try:
            self.aside.restore()
        except OSError as e:
            print(f"the run failed before its first best model, and putting the previous run back failed too "
                  f"({e.strerror or e}): it is in {self.aside.path}", flush=True)
        else:
            print(f"the run failed before its first best model: the previous run's outputs are back in "
                  f"{self.aside.output_dir}", flush=True)


# --- where a training run starts --------------------------------------------------------------------------------

def resume_point(cfg, accelerator) -> str | None:
    """The checkpoint this training run continues from, or None for a fresh start (see the module docstring).
    UserError when `latest` finds no checkpoint and a fresh start would replace or hide another run."""
    from .checkpoints import resolve_resume

    if not cfg.resume_from_checkpoint:
        return None
    path = resolve_resume(cfg, accelerator)
    if path is not None or cfg.resume_from_checkpoint != "latest":
        return path
    what = "--resume_from_checkpoint latest"
    aside = SetAside(cfg.output_dir)
    if aside.exists():
        raise UserError(aside.refusal(f"{what} (no checkpoint in {cfg.output_dir})"))
    trained = [name for name in run_outputs(cfg.output_dir) if name in (BEST_DIR, RESULTS)]
    if trained and not cfg.overwrite_output_dir:
        raise UserError(f"{what}: {cfg.output_dir} holds a run's {trained[0]} but no checkpoint to resume from; "
                        "pass --overwrite_output_dir to replace that run, or use another --output_dir")
    accelerator.print(f"{what}: no checkpoint in {cfg.output_dir} yet, starting afresh")
    return None
