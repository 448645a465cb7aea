"""`python -m afqmc_dist.kfold CONFIG --folds K --output_dir D [--workers N]`: see the package docstring
(afqmc_dist/kfold/__init__.py)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings

from ..errors import EXIT_STOPPED, CommandParser, TrainingStopped, UserError, log_errors_to
from ..preemption import run_command
from ..sweep.spec import GRACE_RANGE, HEARTBEAT_RANGE

# Set in the workers that `--workers N` starts: the command that started them writes the k-fold's results.
WORKER_ENV = "AFQMC_KFOLD_WORKER"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from . import __doc__ as description

    parser = CommandParser(prog="python -m afqmc_dist.kfold", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="train.py's config file (YAML/JSON): train_file, model_checkpoint and any "
                                       "other run option; no dev_file (the folds give it)")
    parser.add_argument("--folds", type=int, required=True, help="K, the number of folds (at least 2)")
    parser.add_argument("--output_dir", required=True, help="the k-fold's folder D (folds, runs, results)")
    parser.add_argument("--workers", type=int, default=1, help="local workers, each running one fold at a time "
                                                               "(default 1)")
    parser.add_argument("--seed", type=int, help="seeds the folds and every run (default: the config's seed, or 42)")
    parser.add_argument("--storage", help="Optuna storage URL shared by workers on many machines, e.g. "
                                          "postgresql://user@host/db (default: sqlite:///D/runs/study.db)")
    parser.add_argument("--launcher", help="the command every run starts with, its options following as --config "
                                           "FILE (default: python train.py), e.g. 'accelerate launch ... train.py'")
    parser.add_argument("--heartbeat_interval", type=int, default=60, help="seconds between a running fold's "
                                                                           "heartbeats (default 60)")
    parser.add_argument("--grace_period", type=int, default=180, help="a fold without a heartbeat for this long "
                                                                      "is run again, from its checkpoint (default 180)")
    args = parser.parse_args(argv)
    if args.folds < 2:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {args.seed}")
    for flag, (low, high) in (("heartbeat_interval", HEARTBEAT_RANGE), ("grace_period", GRACE_RANGE)):
        if not low <= getattr(args, flag) <= high:
            raise UserError(f"--{flag} must be from {low} to {high} seconds, got {getattr(args, flag)}")
    if args.grace_period <= args.heartbeat_interval:
        raise UserError(f"--grace_period ({args.grace_period}) must be longer than --heartbeat_interval "
                        f"({args.heartbeat_interval}), or live folds would be taken for dead")
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("optuna") is None:
        raise UserError("k-fold needs Optuna: pip install optuna")
    from .load import load_kfold

    kfold = load_kfold(args)  # checked in full: nothing is written before
    import optuna

    from ..sweep.study import open_sweep
    from ..sweep.worker import StopSignals
    from .trials import fold_runs, queue_folds

    # As in the sweep: no "experimental" notices, and the worker's own lines rather than Optuna's.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    _prepare(kfold)
    spec = kfold.spec()
    workers = args.workers > 1
    storage_url, study, sampler_seed = open_sweep(spec, kfold.runs_dir, args.storage, worker=not workers)
    queue_folds(study, kfold.runs_dir, kfold.folds)
    kept = fold_runs(study, kfold.runs_dir, kfold.seed).count()
    stop = StopSignals()
    try:
        if workers:
            _start_workers(args, kfold, spec, study)
        else:
            _work(spec, study, kfold.runs_dir, storage_url, sampler_seed, stop)
    except TrainingStopped as e:
        if e.exit_code != EXIT_STOPPED:
            raise
        why = f"{stop.received} received" if stop.received else str(e)
        done = fold_runs(study, kfold.runs_dir, kfold.seed).count()
        raise TrainingStopped(f"{why}: the k-fold stopped with {done} of {kfold.folds} folds done; run the same "
                              "command again to continue (a fold under way resumes from its checkpoint)",
                              exit_code=EXIT_STOPPED) from None
    if not os.environ.get(WORKER_ENV):
        _finish(kfold, study, kept)


def _prepare(kfold) -> None:
    """D marked as this k-fold's, and its fold files written (kept as they are by a rerun)."""
    from .folder import folder_lock, mark_folder
    from .folds import fold_lines, fold_summary, write_folds

    labels = [example.label for example in kfold.examples]
    summary = fold_summary(labels, kfold.fold_of, kfold.folds, kfold.seed, kfold.train_file, kfold.label_list)
    with folder_lock(kfold.output_dir):
        mark_folder(kfold.output_dir, kfold.identity(), kfold.study_name)
        log_errors_to(kfold.output_dir)  # the traceback of an unexpected error: D/error.log
        write_folds(kfold.output_dir, fold_lines(kfold.examples), kfold.fold_of, summary)


def _work(spec, study, runs_dir: str, storage_url: str, sampler_seed, stop) -> None:
    """This process as the one worker: it runs folds until every fold has run (or a stop signal)."""
    from ..sweep.worker import Worker

    with stop.handling():
        Worker(spec, study, runs_dir, storage_url, stop, sampler_seed).run()


def _start_workers(args: argparse.Namespace, kfold, spec, study) -> None:
    """--workers N: N workers here, each this command with one worker (their seed as this one resolved it)."""
    from ..sweep.worker import start_workers, trackers_env, worker_environments

    envs = [{**env, WORKER_ENV: "1"} for env in worker_environments(args.workers)]
    trackers_env(spec, study, kfold.runs_dir)  # the MLflow parent run, made once before the workers
    command = ["-m", "afqmc_dist.kfold", args.config, "--folds", str(args.folds), "--output_dir", args.output_dir,
               "--seed", str(kfold.seed), "--heartbeat_interval", str(args.heartbeat_interval),
               "--grace_period", str(args.grace_period)]
    for flag in ("storage", "launcher"):
        command += [f"--{flag}", getattr(args, flag)] if getattr(args, flag) else []
    start_workers(command, envs)


def _finish(kfold, study, kept: int) -> None:
    """Every fold has run: write the out-of-fold predictions, cv.md and ensemble.json, and say so in one line."""
    from .folder import CV_MD, ENSEMBLE_JSON, OOF_PREDICTIONS
    from .oof import write_outputs
    from .trials import check_all_done, fold_runs

    runs = fold_runs(study, kfold.runs_dir, kfold.seed)
    check_all_done(runs, kfold.folds, kfold.runs_dir, kfold.seed)
    oof = write_outputs(kfold, runs.complete).oof
    print(f"k-fold done: {kfold.folds} folds ({kept} kept from an earlier run, {kfold.folds - kept} run now); "
          f"out-of-fold accuracy {oof['accuracy']:.4f}, F1 {oof['f1']:.4f} over {oof['count']} pairs; "
          f"{os.path.join(kfold.output_dir, CV_MD)}, {OOF_PREDICTIONS}, {ENSEMBLE_JSON}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the k-fold (or one worker of it); return the exit status."""
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
