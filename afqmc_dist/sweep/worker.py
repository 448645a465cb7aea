"""A sweep worker: takes trials from the study and runs each, one training run per seed, until the study has its
trials; and the local workers of `--workers N` (see the package docstring for faults and stop signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

from ..errors import EXIT_OK, EXIT_PRUNED, EXIT_STOPPED, EXIT_USER, TrainingStopped, UserError, first_line
from ..files import DISK_FULL, free_mib
from ..preemption import handling
from ..tracking import close_mlflow_sweep_parent, mlflow_sweep_parent
from .ledger import Ledger
from .runs import SeedResult, claim_trial_dir, finished_seed, run_seed
from .spec import SweepSpec
from .study import MLFLOW_PARENT_ATTR, UID_ATTR, WORKER_ENV, worker_name

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class StopSignals:
    """Records stop signals and passes them to the running seed: SIGTERM the first time (it saves a checkpoint and
    stops), SIGINT after that (the tool's second Ctrl-C: it quits at once)."""

    def __init__(self):
        self.received: str | None = None
        self.count = 0
        self.child: subprocess.Popen | None = None

    def handling(self):
        return handling(STOP_SIGNALS, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        self.received = self.received or signal.Signals(signum).name
        self.forward()

    def forward(self):
        child = self.child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signal.SIGTERM if self.count == 1 else signal.SIGINT)
            except ProcessLookupError:
                pass

    def started(self, child):
        self.child = child
        if child is not None and self.count:  # a signal came while the run was being started
            self.forward()


class RunFailed(Exception):
    """A seed run failed (bad input, NaN, an error): the trial is marked failed and the study goes on."""


class Interrupted(Exception):
    """A seed run stopped on a signal after saving a checkpoint: the trial is queued again."""


class Unneeded(Exception):
    """Another worker took the last trial first: this one is dropped (marked failed, `unneeded`)."""


class Worker:
    """Takes trials from the study and runs them until the study has its trials (or a stop signal)."""

    def __init__(self, spec: SweepSpec, study, sweep_dir: str, storage_url: str, stop: StopSignals,
                 sampler_seed: int | None):
        self.spec, self.study, self.sweep_dir, self.storage_url, self.stop = spec, study, sweep_dir, storage_url, stop
        self.sampler_seed = sampler_seed
        self.name = worker_name()
        self.interrupted: int | None = None
        self.disk_full: str | None = None  # the line of a seed run that found the disk full
        self.heartbeat_failed = False
        self.trackers_env = trackers_env(spec, study, sweep_dir)

    def say(self, text: str) -> None:
        print(f"[worker {self.name}] {text}" if self.name else text, flush=True)

    def run(self) -> None:
        """Take trials until the study has `n_trials` of them (waiting out trials other workers still run). A
        storage that cannot be written (a full disk under study.db, a database gone) ends the worker in one line:
        the trial it was running stays in the storage as running, and is retried (as stale) by the next run."""
        previous, threading.excepthook = threading.excepthook, self.thread_failed
        try:
            self.take_trials()
        except Exception as e:
            failure = storage_failure(e)
            if failure is None:
                raise
            on_disk = f" ({free_mib(self.sweep_dir):.0f} {DISK_FULL})" if "sqlite" in self.storage_url else ""
            raise UserError(f"the study's storage cannot be written ({failure}){on_disk}; once it can, run the same "
                            "command again to continue the study") from None
        finally:
            threading.excepthook = previous

    def thread_failed(self, args) -> None:
        """Optuna's heartbeat thread failed (its storage cannot be written): one line, once; the worker's own next
        call to the storage fails the same way and ends it (see `run`)."""
        if not self.heartbeat_failed:
            self.heartbeat_failed = True
            why = storage_failure(args.exc_value) or f"{args.exc_type.__name__}: {first_line(args.exc_value)}"
            self.say(f"the running trial's heartbeat could not be written ({why})")

    def take_trials(self) -> None:
        from optuna.storages import fail_stale_trials

        if self.sampler_seed is not None:
            self.say(f"sampler seed {self.sampler_seed} (the sweep file's plus the workers started before this one)")
        idle_since = None
        while True:
            if self.stop.received:
                raise TrainingStopped(f"{self.stop.received} received: this worker stopped; run the same command "
                                      "again to continue the study", exit_code=EXIT_STOPPED)
            fail_stale_trials(self.study)
            ledger = Ledger(self.study.get_trials(deepcopy=False))
            if ledger.waiting or ledger.taken() < self.spec.n_trials:
                idle_since = None
                self.interrupted = None
                self.study.optimize(self.objective, n_trials=1, catch=(RunFailed, Interrupted, Unneeded))
                if self.interrupted is not None:
                    self.requeue(self.interrupted)
                if self.disk_full:
                    raise UserError(f"{self.disk_full}; the trial is queued again: free some space and run the same "
                                    "command again")
                continue
            if not ledger.running:
                break
            if idle_since is None:
                idle_since = time.time()
                self.say(f"{len(ledger.running)} trial(s) still running elsewhere; waiting up to "
                         f"{self.spec.grace_period} s in case one of their workers is gone")
            if time.time() - idle_since >= self.spec.grace_period + self.spec.heartbeat_interval:
                break
            time.sleep(min(self.spec.heartbeat_interval, 2))
        self.summarize(ledger)

    def summarize(self, ledger: Ledger) -> None:
        """The closing line: the study's trials by state, and the best one."""
        counts = ledger.counts()
        done = sum(counts.get(k, 0) for k in ("complete", "pruned", "failed"))
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        best, value = "", None
        try:
            best_trial = self.study.best_trial
            value = best_trial.value
            spread = best_trial.user_attrs.get("std") if len(self.spec.seeds) > 1 else None
            best = (f"; best: trial {Ledger.slot_of(best_trial)} {self.spec.objective} {value:.4f}"
                    + (f" ± {spread:.4f}" if spread is not None else ""))
        except ValueError:
            pass  # no complete trial yet
        self.say(f"study {self.spec.study_name}: {done} of {self.spec.n_trials} trials finished ({summary}){best}. "
                 f"Report: python -m afqmc_dist.report {self.sweep_dir}")
        if done >= self.spec.n_trials and not ledger.running:
            close_mlflow_sweep_parent(self.trackers_env, f"best_{self.spec.objective}", value)

    def requeue(self, number: int) -> None:
        """Queue a trial stopped by a signal again at once (as the heartbeat would, later)."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            RetryHeartbeatStaleTrialCallback()(self.study, trial)

    def objective(self, trial) -> float:
        """One trial: its configuration run once per seed in its own folder; its value the mean over seeds."""
        ledger = Ledger(self.study.get_trials(deepcopy=False))
        slot = Ledger.slot_of(ledger.trial(trial.number))
        if slot == trial.number and ledger.taken(before=trial.number) >= self.spec.n_trials:
            trial.set_user_attr("unneeded", f"the study already had its {self.spec.n_trials} trials")
            raise Unneeded()
        params = {p.name: p.suggest(trial) for p in self.spec.space}
        if self.sampler_seed is not None:
            trial.set_user_attr("sampler_seed", self.sampler_seed)
        folder = claim_trial_dir(self.sweep_dir, slot, self.spec.study_name, self.study.user_attrs[UID_ATTR])
        retry = f" (again, as Optuna trial {trial.number})" if slot != trial.number else ""
        self.say(f"trial {slot}{retry}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        trial.set_user_attr("folder", os.path.relpath(folder, self.sweep_dir))
        values, runs = {}, {}
        for index, seed in enumerate(self.spec.seeds):
            if self.stop.received:
                self.interrupted = trial.number
                raise Interrupted()
            seed_folder = os.path.join(folder, f"seed-{seed}")
            runs[str(seed)] = os.path.relpath(seed_folder, self.sweep_dir)
            result = self.run_seed(trial, slot, params, seed, seed_folder, report=index == 0)
            if result.status != EXIT_OK:
                trial.set_user_attr("seed_values", values)
                trial.set_user_attr("runs", runs)
                self.end_trial(trial, slot, seed, seed_folder, result)
            values[str(seed)] = result.value
        mean = sum(values.values()) / len(values)
        std = (sum((v - mean) ** 2 for v in values.values()) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        for key, value in (("seed_values", values), ("std", std), ("runs", runs)):
            trial.set_user_attr(key, value)
        self.say(f"trial {slot}: {self.spec.objective} {mean:.4f}"
                 + (f" ± {std:.4f} over seeds {', '.join(values)}" if len(values) > 1 else ""))
        return mean

    def end_trial(self, trial, slot: int, seed: int, seed_folder: str, result: SeedResult) -> None:
        """A seed run that did not finish ends its trial: queued again (stopped), pruned, or failed."""
        import optuna

        if result.status == EXIT_STOPPED:
            self.interrupted = trial.number
            self.say(f"trial {slot} seed {seed}: stopped ({result.line}); the trial is queued again")
            raise Interrupted()
        if result.status == EXIT_USER and DISK_FULL in (result.line or ""):
            # Not the configuration's fault: every trial would fail the same way. The worker stops.
            self.interrupted = trial.number
            self.disk_full = f"trial {slot} seed {seed}: {result.line.removeprefix('error: ')}"
            raise Interrupted()
        if result.status == EXIT_PRUNED:
            trial.set_user_attr("pruned", f"seed {seed}: {result.line}")
            self.say(f"trial {slot}: pruned ({result.line})")
            raise optuna.TrialPruned(result.line)
        error = f"seed {seed}: exit status {result.status}: {result.line or 'no message'}"
        trial.set_user_attr("error", error)
        self.say(f"trial {slot}: failed: {error} (log: {seed_folder}.log)")
        raise RunFailed(error)

    def run_seed(self, trial, slot: int, params: dict, seed: int, folder: str, report: bool) -> SeedResult:
        """One seed's run of the trial (or its record, if an earlier attempt finished it); `report`: the run
        reports its evaluations to the study's pruner."""
        from .pruning import METRIC_ENV, PRUNER_ENV, STORAGE_ENV, STUDY_ENV, TRIAL_ENV

        done = finished_seed(folder, params)
        if done is not None:
            self.say(f"trial {slot} seed {seed}: done before ({self.spec.objective} {done.value:.4f})")
            return done
        options = self.spec.run_options(params, seed, folder)
        options["run_name"] = f"{options.get('run_name') or self.spec.study_name}-trial{slot:04d}-seed{seed}"
        if "wandb" in _trackers(options):
            options.setdefault("wandb_group", self.spec.study_name)
        env = dict(self.trackers_env)
        if report and self.spec.pruner:
            env.update({STORAGE_ENV: self.storage_url, STUDY_ENV: self.spec.study_name,
                        TRIAL_ENV: str(trial._trial_id),  # how Optuna names a trial in its storage
                        METRIC_ENV: self.spec.metric, PRUNER_ENV: json.dumps(self.spec.pruner)})
        self.say(f"trial {slot} seed {seed}: training (log: {folder}.log)")
        result = run_seed(self.spec.launcher, options, folder, self.spec.metric, params, env, self.stop.started)
        if result.status == EXIT_OK:
            self.say(f"trial {slot} seed {seed}: {self.spec.objective} {result.value:.4f} ({result.seconds:.0f} s)")
        return result


def storage_failure(error: BaseException | None) -> str | None:
    """The database error behind `error`, or None. Optuna reports a trial whose end it could not record as
    `AssertionError: Should not reach`, with the storage's error as its context."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SQLAlchemyError):
            return first_line(error)
        if isinstance(error, StorageInternalError) and error.__cause__ is None:
            return first_line(error)
        error = error.__cause__ or error.__context__
    return None


def _trackers(options: dict) -> list[str]:
    from ..config import RunConfig

    return RunConfig(report_to=options.get("report_to", ["none"])).trackers


def trackers_env(spec: SweepSpec, study, sweep_dir: str) -> dict:
    """Environment for the trials' runs that groups them in the trackers. W&B: the group (set in the run
    options); TensorBoard: nothing (each run writes under SWEEP_DIR, so `tensorboard --logdir SWEEP_DIR` shows
    them all); MLflow: the sweep's parent run, made once per study, under which every run nests."""
    if "mlflow" not in _trackers(spec.base):
        return {}
    from ..tracking import MLFLOW_PARENT_ENV

    parent = study.user_attrs.get(MLFLOW_PARENT_ATTR)
    env = mlflow_sweep_parent(sweep_dir, spec.base.get("wandb_project", "afqmc-dist"), spec.study_name,
                              {p.name: p.describe() for p in spec.space}, parent)
    if parent is None and MLFLOW_PARENT_ENV in env:
        study.set_user_attr(MLFLOW_PARENT_ATTR, env[MLFLOW_PARENT_ENV])
    return env


def worker_environments(count: int) -> list[dict]:
    """The environment of each of `count` local workers: its name, and an equal share of the CPU threads and of
    the GPUs listed in CUDA_VISIBLE_DEVICES (UserError if they do not split evenly)."""
    threads = max(1, (os.cpu_count() or 1) // count)
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if gpus and len(gpus) % count:
        raise UserError(f"--workers {count}: the {len(gpus)} GPUs of CUDA_VISIBLE_DEVICES do not split evenly "
                        "between the workers")
    envs = []
    for k in range(count):
        env = {**os.environ, WORKER_ENV: str(k + 1)}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        if gpus:
            share = len(gpus) // count
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[k * share:(k + 1) * share])
        envs.append(env)
    return envs


def start_workers(command: list[str], envs: list[dict]) -> None:
    """Run `command` (this sweep, as one worker) once per environment and wait for them, passing stop signals on;
    TrainingStopped with the workers' status if any of them did not end with 0."""
    children: list[subprocess.Popen] = []

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    with handling(STOP_SIGNALS, forward):
        for env in envs:
            # Their own sessions: a Ctrl-C in this terminal reaches this process only, which passes it on once.
            children.append(subprocess.Popen([sys.executable, *command], env=env, start_new_session=True))
            time.sleep(0.5)  # staggered: the first trials do not all start at once
        statuses = [child.wait() for child in children]
    failed = [s for s in statuses if s != EXIT_OK]
    if failed:
        status = EXIT_STOPPED if EXIT_STOPPED in failed else max(failed)
        raise TrainingStopped(f"{len(failed)} of {len(envs)} workers ended with status {status} (see above)",
                              exit_code=status)
