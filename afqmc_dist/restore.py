"""Get back a run that an --overwrite_output_dir run set aside and did not finish replacing.

    python -m afqmc_dist.restore OUTPUT_DIR

OUTPUT_DIR/.previous-run/ holds the outputs of the replaced run (best/, results.json, metrics.jsonl, checkpoints/,
...) while the run that replaces it has no best model of its own (see run_folder.py). When that run was killed
(SIGKILL, a lost node) it could not put them back itself, and every later run on the folder refuses to go on
until the set-aside run is restored or removed. This command restores it: it takes the folder's lock (no run may
be using it), removes the unfinished run's outputs (it has no best model: there is nothing of it to keep) and
moves the set-aside run back. A folder whose own run has a best model is refused: the set-aside run is then only
a leftover that could not be removed, and restoring it would replace a finished run.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import CommandParser, UserError, log_errors_to
from .outputs import BEST_DIR
from .preemption import run_command
from .run_folder import RunLock, SetAside


def run(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m afqmc_dist.restore", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the run folder holding .previous-run/")
    output_dir = parser.parse_args(argv).output_dir
    aside = SetAside(output_dir)
    if not os.path.isdir(output_dir) or not aside.exists():
        raise UserError(f"{output_dir}: no run set aside here (no {aside.path})")
    if os.path.isdir(os.path.join(output_dir, BEST_DIR)):
        raise UserError(f"{output_dir} has a best model of its own: {aside.path} is a leftover of the run it "
                        f"replaced; remove {aside.path} if you do not need it")
    lock = RunLock(output_dir)
    lock.acquire()
    log_errors_to(output_dir)
    try:
        names = aside.restore()
    except OSError as e:
        raise UserError(f"cannot put {aside.path} back ({e.strerror or e}); what could not be moved is still "
                        "there") from None
    finally:
        lock.release()
    print(f"restored the set-aside run in {output_dir} ({', '.join(names)})")


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
