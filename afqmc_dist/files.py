"""Writing files so that none is ever left half-written, and saying in one line why a write failed.

Every write goes to a temporary name (`PATH.tmp`) that is renamed over PATH only once it is complete, and is
removed on any error (a full disk, Ctrl-C): PATH is then as it was. Leftovers of a crash (`*.tmp`) are removed
when the next run takes its folder (run_folder.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import UserError

# Every line that blames a full disk says so with these words (a sweep worker stops on them: files.py's
# write_error, checkpoints.check_free_space).
DISK_FULL = "MiB free on its disk"
# What a failed write of weights raises: OSError, torch's RuntimeError ("unexpected pos ..." on a full disk),
# safetensors' own error ("No space left on device").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def free_mib(path: str) -> float:
    """Free space on the disk holding `path` (or its nearest existing parent), in MiB."""
    existing = os.path.abspath(path)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free / 2**20


def write_error(path: str, error: BaseException) -> str:
    """One line for a failed write: what failed, and the free space when the disk is the likely cause."""
    text = str(error).strip()
    reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
    # torch's zip writer reports a full disk as "unexpected pos", safetensors as "No space left on device".
    full = getattr(error, "errno", None) == errno.ENOSPC or "space" in text.lower() or "unexpected pos" in text
    free = f" ({free_mib(path):.0f} {DISK_FULL})" if full or free_mib(path) < 64 else ""
    return f"writing {path} failed: {reason}{free}"


def make_missing_dirs(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, deepest first (for `remove_empty_dirs` to
    undo on failure). OSError as mkdir raises it."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def remove_empty_dirs(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) up to the first that is not empty: it holds something to keep."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def remove_quietly(path: str) -> None:
    """Remove a file or folder the tool wrote (a temporary), ignoring one that is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@contextmanager
def atomic_open(path: str):
    """Open `path` for writing through `path.tmp`, renamed over `path` only if the block completes. On any error
    (a full disk, Ctrl-C) the temporary is removed and `path` is left as it was; OSError becomes a UserError."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(write_error(path, e)) from None
    finally:
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)


def write_jsonl(path: str, records) -> None:
    """One JSON document per line, streamed (predictions of a large file are never one big string)."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def read_jsonl(path: str) -> list[dict]:
    """The JSON documents of a JSON-lines file the tool wrote (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_png(fig, path: str, dpi: int = 90) -> None:
    """A matplotlib figure as PNG at `path`, through a temporary file (a report being opened is never half-written).
    90 dpi: readable, and small enough to keep in a repository."""
    tmp = f"{path}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(write_error(path, e)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def replace_dir(tmp: str, final: str) -> None:
    """Put the finished folder `tmp` at `final`, keeping the old `final` until the new one is in place.

    A crash at any point leaves either the old or the new folder complete at `final`, or (between the two
    renames) the old one complete at `final.old`, which `run_folder.find_best_dir` falls back to.
    """
    old = f"{final}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
