"""Hyperparameter sweeps on Optuna, where every trial is full training runs of this tool, one per seed.

    python -m afqmc_dist.sweep SWEEP.yaml --output_dir SWEEP_DIR [--workers N] [--storage URL]
    python -m afqmc_dist.report SWEEP_DIR                  # sweep.md, sweep.png, best_config.yaml

The sweep file (see spec.py) holds the base run options, the search space, the seeds, the sampler, the
pruner, the trial count, the objective and the launcher. It is checked in full first: a problem is one `error:`
line, exit status 2, and nothing written.

A trial is one configuration run once per seed, each seed a training run of its own (through the launcher, in
SWEEP_DIR/trials/NNNN/seed-S, see runs.py). Its value is the mean over seeds; the per-seed values, their
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

The package, by part:

    __main__.py   the command: flags, the sweep folder and study, one worker or several
    spec.py       a checked sweep file (SweepSpec, Param): what a study searches and how its trials run
    load.py       reading and checking the sweep file, every problem one line naming file, line and key
    study.py      the Optuna storage and study, the sweep folder tied to its study, each worker's sampler seed
    ledger.py     the study's trials counted the way workers share them (slots, retries)
    worker.py     a worker: takes trials from the study and runs them, one training run per seed
    runs.py       one seed's training run through the launcher, in its trial folder
    pruning.py    inside a training run: its evaluations reported to the study's pruner
    report.py     sweep.md, sweep.png and best_config.yaml (`python -m afqmc_dist.report SWEEP_DIR`)
"""
