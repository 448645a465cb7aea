"""The export's output folder: checked before any work, written through a temporary folder renamed into place.

--output_dir may be new, an empty folder or an earlier export (replaced, as a new best/ replaces the old one);
anything else (a run folder, a model, a folder of other files) is refused before anything is loaded. The export is
written into a temporary folder beside it, and only a complete, checked export is renamed into place: a refused
int8 export, an error or a stop signal leaves --output_dir as it was, and no temporary folder behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..files import make_missing_dirs, remove_empty_dirs, replace_dir, write_error
from . import MODEL_FILE, REPORT


def is_exported(folder: str | os.PathLike) -> bool:
    """Whether `folder` is an export written by `python -m afqmc_dist.export`: its model and, written last, its
    report."""
    return os.path.isfile(os.path.join(folder, REPORT)) and os.path.isfile(os.path.join(folder, MODEL_FILE))


def check_output_dir(path: str) -> None:
    """Refuse an --output_dir that cannot take the export without losing something else (see the module doc)."""
    where = f"--output_dir {path}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{where} is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path) and not is_exported(path):
        shown = ", ".join(sorted(os.listdir(path))[:5])
        raise UserError(f"{where} holds other files ({shown}{', ...' if len(os.listdir(path)) > 5 else ''}) and "
                        "is not an earlier export: give a new or empty folder")
    existing = next(p for p in Path(os.path.abspath(path)).parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"{where}: cannot write here ({existing} is not a writable folder)")


@contextmanager
def staged_export(path: str) -> Iterator[str]:
    """A temporary folder beside `path` to write the export into; renamed to `path` when the block completes.

    On any error (a refused gate, a full disk, a stop signal) the temporary folder and the parents created for it
    are removed, and `path` is as it was.
    """
    final = Path(os.path.abspath(path))
    created, tmp, done = [], None, False
    try:
        created = make_missing_dirs(final.parent)
        # mkdir, not mkdtemp: the export gets the usual permissions (umask), not mkdtemp's owner-only ones
        tmp = str(final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)
        yield tmp
        replace_dir(tmp, str(final))
        done = True
    except OSError as e:
        raise UserError(write_error(str(final), e)) from None
    finally:
        if tmp and not done:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:  # deepest first, each empty once the temporary is gone
            remove_empty_dirs(created)
