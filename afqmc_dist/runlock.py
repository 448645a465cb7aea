"""One run per output folder: a lock held by the main process for the whole life of a run that writes there.

    OUTPUT_DIR/.afqmc.lock         the lock (filelock: an flock(2) lock, released by the kernel when its process
                                   dies, however it dies)
    OUTPUT_DIR/.afqmc.lock.json    who holds it: host, process id, start time, command

A second run on a held folder (a retried job whose first attempt is in fact still running, a requeued job that
overlaps the old one) stops before touching anything and names the holder. A lock whose holder was killed is
free again (the kernel dropped it with the process); the next run takes it and says whose it was.

Across nodes the lock is as good as the shared filesystem's flock: NFSv4 and Lustre (mounted with `flock`) pass
it to the server, so runs on different nodes exclude each other; on a filesystem without lock support filelock
falls back to a lock file whose existence is the lock, which a killed run leaves behind (remove
OUTPUT_DIR/.afqmc.lock by hand once you are sure no run uses the folder).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from filelock import FileLock, Timeout

from .errors import UserError

LOCK_FILE, HOLDER_FILE = ".afqmc.lock", ".afqmc.lock.json"


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
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        tmp = f"{self.holder_path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(holder, f, ensure_ascii=False)
        os.replace(tmp, self.holder_path)

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
