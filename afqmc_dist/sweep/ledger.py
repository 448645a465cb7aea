"""The study's trials counted the way the workers share them: by slot, a retried trial in the slot it retries."""

from __future__ import annotations

import warnings
from collections import Counter


class Ledger:
    """The study's trials grouped by slot. A slot is one of the study's `n_trials` configurations: one trial, or a
    chain of them when a trial whose worker was lost is queued again (Optuna's RetryHeartbeatStaleTrialCallback
    records the first trial's number in every retry; that number names the slot and its folder).

    A slot's state is its latest trial's: complete, pruned, failed (its run failed: user attribute `error`),
    running, waiting (queued), or lost (failed with no run error and no retry: a worker's bug). Trials dropped
    because another worker took the last slot first (`unneeded`) belong to no slot.
    """

    def __init__(self, trials):
        from optuna.trial import TrialState

        self.by_number = {t.number: t for t in trials}
        self.slots: dict[int, list] = {}
        for trial in sorted(trials, key=lambda t: t.number):
            if "unneeded" not in trial.user_attrs:
                self.slots.setdefault(self.slot_of(trial), []).append(trial)
        self.waiting = [t for t in trials if t.state == TrialState.WAITING]
        self.running = [t for t in trials if t.state == TrialState.RUNNING]

    @staticmethod
    def slot_of(trial) -> int:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an "experimental" notice
            first = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
        return trial.number if first is None else first

    def trial(self, number: int):
        return self.by_number[number]

    def state(self, slot: int) -> str:
        latest = self.slots[slot][-1]
        name = latest.state.name.lower()
        if name == "fail":
            return "failed" if "error" in latest.user_attrs else "lost"
        return name

    def taken(self, before: int | None = None) -> int:
        """Slots that count towards the study's trials (all but lost ones), numbered below `before` if given."""
        return sum(1 for slot in self.slots if (before is None or slot < before) and self.state(slot) != "lost")

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.state(slot) for slot in sorted(self.slots)))

    def finished(self) -> list:
        """The latest trial of every finished slot (complete, pruned, failed), by slot number."""
        return [self.slots[s][-1] for s in sorted(self.slots) if self.state(s) in ("complete", "pruned", "failed")]
