"""Small agreements between processes: what one rank found out, every rank learns, so all take the same branch.

A file written by the main process only (a checkpoint's manifest, best/) can fail there alone (a full disk); the
other ranks must raise the same error instead of waiting at the next collective for a rank that is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate.utils import broadcast_object_list, gather_object

T = TypeVar("T")


def first_error(accelerator, error: str | None) -> str | None:
    """Every rank's `error` (None when it went well) gathered; the first one found, on every rank. A collective."""
    if accelerator.num_processes == 1:
        return error
    return next((e for e in gather_object([error]) if e is not None), None)


def on_main(accelerator, work: Callable[[], T]) -> T:
    """Run `work()` on the main process only and give its result (or the UserError it raised) to every rank.

    `work` must return something picklable. A collective: call on every rank.
    """
    from .errors import UserError

    outcome: list = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [work(), None]
        except UserError as e:
            outcome = [None, str(e)]
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise UserError(outcome[1])
    return outcome[0]
