"""Hyperparameter sweeps on Optuna, where every trial is full training runs of this tool, one per seed.

    python -m afqmc_dist.sweep SWEEP.yaml --output_dir SWEEP_DIR [--workers N] [--storage URL]
    python -m afqmc_dist.report SWEEP_DIR                  # sweep.md, sweep.png, best_config.yaml

The sweep file (see sweep_config.py) holds the base run options, the search space, the seeds, the sampler, the
pruner, the trial count, the objective and the launcher. It is checked in full first: a problem is one `error:`
line, exit status 2, and nothing written.

A trial is one configuration run once per seed, each seed a training run of its own (through the launcher, in
SWEEP_DIR/trials/NNNN/seed-S, see sweep_runs.py). Its value is the mean over seeds; the per-seed values, their
standard deviation and the run folders are stored on the trial (Optuna user attributes).

Storage and workers. The study lives in SWEEP_DIR/study.db (SQLite) or in `--storage URL` (any database URL
Optuna takes, e.g. postgresql://user@host/db), and every worker is this same command: `--workers N` starts N
here; on many machines, start it on each (with SWEEP_DIR on a shared filesystem). Workers share the study
through the storage: each takes the next trial the sampler proposes, or a trial waiting to be retried, until the
study has its `n_trials` trials. Two workers never run the same trial.

Faults. A worker keeps a heartbeat for its trial in the storage. A worker that dies (SIGKILL, node loss) stops
beating; after `grace_period` seconds its trial is failed as stale and queued again (Optuna's
RetryHeartbeatStaleTrialCallback) under the same trial folder, where a later worker resumes each seed from its
checkpoint. SIGTERM / SIGUSR1 / Ctrl-C stop a worker cleanly: the running seed saves a checkpoint and stops, its
trial is queued again at once, and the worker exits with status 3. Running the same command again continues the
study to its trial count. A trial whose run fails (bad input, a NaN loss) is marked failed with the run's line,
and the study goes on. With a pruner, the trial's first seed reports every dev evaluation to the study and stops
with exit status 5 when the pruner says so (pruning.py): the trial is marked pruned.

Exit status: 0 when the study has all its trials, 3 after a stop signal, 2 for bad input, 4 for an unexpected
error.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import warnings

from .errors import EXIT_OK, EXIT_PRUNED, EXIT_STOPPED, TrainingStopped, UserError, exit_status, log_errors_to
from .sweep_config import SweepSpec
from .sweep_file import load_sweep
from .sweep_runs import run_seed, trial_dir
from .sweep_study import (
    WORKER_ENV,
    Ledger,
    close_mlflow_parent,
    mark_sweep_dir,
    open_study,
    prepare_sweep_dir,
    sweep_trackers_env,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m afqmc_dist.sweep", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", help="the sweep file (YAML): base options, search space, seeds, ...")
    parser.add_argument("--output_dir", required=True, help="the sweep folder (study.db, trials/, reports)")
    parser.add_argument("--workers", type=int, default=1, help="local workers to start (default 1)")
    parser.add_argument("--storage", help="Optuna storage URL shared by workers on many machines (default: "
                                          "sqlite:///SWEEP_DIR/study.db)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    return args


class StopSignals:
    """Records stop signals and passes them to the running seed: SIGTERM the first time (it saves a checkpoint and
    stops), SIGINT after that (the tool's second Ctrl-C: it quits at once)."""

    def __init__(self):
        self.received: str | None = None
        self.count = 0
        self.child: subprocess.Popen | None = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

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

    def __init__(self, spec: SweepSpec, study, sweep_dir: str, storage_url: str, stop: StopSignals):
        self.spec, self.study, self.sweep_dir, self.storage_url, self.stop = spec, study, sweep_dir, storage_url, stop
        self.name = os.environ.get(WORKER_ENV)
        self.interrupted: int | None = None
        self.trackers_env = sweep_trackers_env(spec, study, sweep_dir)

    def say(self, text: str) -> None:
        print(f"[worker {self.name}] {text}" if self.name else text, flush=True)

    def run(self) -> None:
        from optuna.storages import fail_stale_trials

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
                continue
            if ledger.running and idle_since is None:
                idle_since = time.time()
                self.say(f"{len(ledger.running)} trial(s) still running elsewhere; waiting up to "
                         f"{self.spec.grace_period} s in case one of their workers is gone")
            if ledger.running and time.time() - idle_since < self.spec.grace_period + self.spec.heartbeat_interval:
                time.sleep(min(self.spec.heartbeat_interval, 2))
                continue
            break
        counts = ledger.counts()
        done = sum(counts.get(k, 0) for k in ("complete", "pruned", "failed"))
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        best = ""
        try:
            best_trial = self.study.best_trial
            best = (f"; best: trial {Ledger.slot_of(best_trial)} {self.spec.objective} {best_trial.value:.4f}"
                    + (f" ± {best_trial.user_attrs['std']:.4f}" if "std" in best_trial.user_attrs
                       and len(self.spec.seeds) > 1 else ""))
        except ValueError:
            pass  # no complete trial yet
        self.say(f"study {self.spec.study_name}: {done} of {self.spec.n_trials} trials finished ({summary}){best}. "
                 f"Report: python -m afqmc_dist.report {self.sweep_dir}")
        if done >= self.spec.n_trials and not ledger.running:
            close_mlflow_parent(self.trackers_env, self.study, self.spec)

    def requeue(self, number: int) -> None:
        """Queue a trial stopped by a signal again at once (as the heartbeat would, later)."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            RetryHeartbeatStaleTrialCallback()(self.study, trial)

    def objective(self, trial) -> float:
        import optuna

        ledger = Ledger(self.study.get_trials(deepcopy=False))
        frozen = ledger.trial(trial.number)
        slot = Ledger.slot_of(frozen)
        if slot == trial.number and ledger.taken(before=trial.number) >= self.spec.n_trials:
            trial.set_user_attr("unneeded", f"the study already had its {self.spec.n_trials} trials")
            raise Unneeded()
        params = {p.name: p.suggest(trial) for p in self.spec.space}
        folder = trial_dir(self.sweep_dir, slot)
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
            if result.status == EXIT_OK:
                values[str(seed)] = result.value
                continue
            trial.set_user_attr("seed_values", values)
            trial.set_user_attr("runs", runs)
            if result.status == EXIT_STOPPED:
                self.interrupted = trial.number
                self.say(f"trial {slot} seed {seed}: stopped ({result.line}); the trial is queued again")
                raise Interrupted()
            if result.status == EXIT_PRUNED:
                trial.set_user_attr("pruned", f"seed {seed}: {result.line}")
                self.say(f"trial {slot}: pruned ({result.line})")
                raise optuna.TrialPruned(result.line)
            error = f"seed {seed}: exit status {result.status}: {result.line or 'no message'}"
            trial.set_user_attr("error", error)
            self.say(f"trial {slot}: failed: {error} (log: {seed_folder}.log)")
            raise RunFailed(error)
        mean = sum(values.values()) / len(values)
        std = (sum((v - mean) ** 2 for v in values.values()) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        for key, value in (("seed_values", values), ("std", std), ("runs", runs)):
            trial.set_user_attr(key, value)
        self.say(f"trial {slot}: {self.spec.objective} {mean:.4f}"
                 + (f" ± {std:.4f} over seeds {', '.join(values)}" if len(values) > 1 else ""))
        return mean

    def run_seed(self, trial, slot: int, params: dict, seed: int, folder: str, report: bool):
        """One seed's run of the trial (or its record, if an earlier attempt finished it); `report`: the run
        reports its evaluations to the study's pruner."""
        from .pruning import METRIC_ENV, PRUNER_ENV, STORAGE_ENV, STUDY_ENV, TRIAL_ENV
        from .sweep_runs import finished_seed

        done = finished_seed(folder, params)
        if done is not None:
            self.say(f"trial {slot} seed {seed}: done before ({self.spec.objective} "
                     f"{done.value:.4f})")
            return done
        options = self.spec.run_options(params, seed, folder)
        options["run_name"] = f"{options.get('run_name') or self.spec.study_name}-trial{slot:04d}-seed{seed}"
        if "wandb" in _trackers(options):
            options.setdefault("wandb_group", self.spec.study_name)
        env = dict(self.trackers_env)
        if report and self.spec.pruner:
            import json

            env.update({STORAGE_ENV: self.storage_url, STUDY_ENV: self.spec.study_name,
                        TRIAL_ENV: str(trial._trial_id),  # how Optuna names a trial in its storage
                        METRIC_ENV: self.spec.metric, PRUNER_ENV: json.dumps(self.spec.pruner)})
        self.say(f"trial {slot} seed {seed}: training (log: {folder}.log)")
        result = run_seed(self.spec.launcher, options, folder, self.spec.metric, params, env, self.stop.started)
        if result.status == EXIT_OK:
            self.say(f"trial {slot} seed {seed}: {self.spec.objective} {result.value:.4f} "
                     f"({result.seconds:.0f} s)")
        return result


def _trackers(options: dict) -> list[str]:
    from .config import RunConfig

    return RunConfig(report_to=options.get("report_to", ["none"])).trackers


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


def start_workers(args, envs: list[dict]) -> None:
    """Run one copy of this command per environment (each one worker) and wait for them, passing stop signals on;
    TrainingStopped with the workers' status if any of them did not end with 0."""
    command = [sys.executable, "-m", "afqmc_dist.sweep", args.sweep_file, "--output_dir", args.output_dir]
    if args.storage:
        command += ["--storage", args.storage]
    children = []

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        for env in envs:
            # Their own sessions: a Ctrl-C in this terminal reaches this process only, which passes it on once.
            children.append(subprocess.Popen(command, env=env, start_new_session=True))
            time.sleep(0.5)  # staggered: the first trials do not all start at once
        statuses = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [s for s in statuses if s != EXIT_OK]
    if failed:
        status = EXIT_STOPPED if EXIT_STOPPED in failed else max(failed)
        raise TrainingStopped(f"{len(failed)} of {len(envs)} workers ended with status {status} (see above)",
                              exit_code=status)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import optuna
    except ImportError:
        raise UserError("sweeps need Optuna: pip install optuna") from None
    # Notices that the heartbeat, the retry callback and TPE's constant liar are "experimental" in Optuna.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # The worker says what happened to each trial in its own lines; Optuna's would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = load_sweep(args.sweep_file, args.output_dir)
    envs = worker_environments(args.workers) if args.workers > 1 else []
    storage_url = prepare_sweep_dir(spec, args.output_dir, args.storage)
    log_errors_to(args.output_dir)  # the traceback of an unexpected error: SWEEP_DIR/error.log
    study = open_study(spec, storage_url)
    mark_sweep_dir(spec, args.output_dir, storage_url)
    if args.workers > 1:
        sweep_trackers_env(spec, study, args.output_dir)  # the MLflow parent run, made once before the workers
        start_workers(args, envs)
        return
    with StopSignals() as stop:
        Worker(spec, study, args.output_dir, storage_url, stop).run()


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or one worker of it); return the exit status."""
    return exit_status(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
