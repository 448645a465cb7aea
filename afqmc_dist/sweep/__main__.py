"""`python -m afqmc_dist.sweep SWEEP.yaml --output_dir SWEEP_DIR [--workers N] [--storage URL]`: see the package
docstring (afqmc_dist/sweep/__init__.py)."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import CommandParser, UserError, log_errors_to
from ..preemption import run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from . import __doc__ as description

    parser = CommandParser(prog="python -m afqmc_dist.sweep", description=description,
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


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import optuna
    except ImportError:
        raise UserError("sweeps need Optuna: pip install optuna") from None
    from .load import load_sweep
    from .study import open_sweep
    from .worker import StopSignals, Worker, start_workers, trackers_env, worker_environments

    # Notices that the heartbeat, the retry callback and TPE's constant liar are "experimental" in Optuna.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # The worker says what happened to each trial in its own lines; Optuna's would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = load_sweep(args.sweep_file, args.output_dir)  # checked in full: nothing is written before
    envs = worker_environments(args.workers) if args.workers > 1 else []
    storage_url, study, sampler_seed = open_sweep(spec, args.output_dir, args.storage, worker=not envs)
    log_errors_to(args.output_dir)  # the traceback of an unexpected error: SWEEP_DIR/error.log
    if envs:
        trackers_env(spec, study, args.output_dir)  # the MLflow parent run, made once before the workers
        command = ["-m", "afqmc_dist.sweep", args.sweep_file, "--output_dir", args.output_dir]
        start_workers(command + (["--storage", args.storage] if args.storage else []), envs)
        return
    stop = StopSignals()
    with stop.handling():
        Worker(spec, study, args.output_dir, storage_url, stop, sampler_seed).run()


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or one worker of it); return the exit status."""
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
