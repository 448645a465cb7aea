"""K-fold cross-validation on the sweep machinery: K training runs of the tool, each on K-1 folds of the training
file, evaluated on and predicting the fold it left out; out-of-fold predictions for every pair; an ensemble.

    python -m afqmc_dist.kfold CONFIG --folds K --output_dir D [--workers N] [--seed S]
        (and --launcher CMD, --storage URL, --heartbeat_interval S, --grace_period S: see --help)
    python -m afqmc_dist.predict --model D --input PAIRS.json --output OUT.jsonl    # the K fold models together

CONFIG is train.py's config file (`train.py --config FILE`): it gives `train_file`, `model_checkpoint` and any other
run option. It gives no `dev_file`: that is refused, as are the other options the k-fold sets for each run (see
load.py). Everything is checked first: a bad flag, config file, training file line (FILE:LINE), a K above the count
of the training file's rarest label, or a D holding another k-fold (another config, K, seed or training file) is
one `error:` line, exit status 2, and nothing written.

The k-fold is a sweep (afqmc_dist/sweep/) whose one parameter is the fold: a grid over 0 .. K-1, one seed, K
trials, each fold's trial queued in advance so that trial k is fold k. So it is what a sweep is: its study in
D/runs/study.db (or `--storage URL`), resumable, shared by any number of workers (`--workers N` here; on many
machines the same command on each, with `--storage` and D on a filesystem they share), a worker killed mid-fold
found by its missing heartbeat and its fold run again from the fold's last checkpoint (every run passes
`--resume_from_checkpoint latest`), a finished fold never run again. SIGTERM / SIGUSR1 / Ctrl-C stop it cleanly
(the fold under way saves a checkpoint; exit status 3); the same command continues it. A fold whose run fails ends
the k-fold with that run's line: 2 bad input, 1 a NaN loss, 4 anything else.

D holds:

    kfold.json               what the k-fold depends on (K, seed, training file and its sha256, run options)
    folds.json, folds/fold-k/{train,dev}.json    the folds (folds.py)
    runs/                    the sweep folder: study.db, trials/NNNN/seed-S/ (fold k's run: best/, results.json,
                             predictions.jsonl of its dev fold, checkpoints/, ...), its .yaml, .log and .json
    oof_predictions.jsonl, cv.md, ensemble.json  once every fold has run (oof.py)
    error.log                the traceback of an unexpected error

Exit status: 0 when every fold has run and the results are written, 2 bad input, 3 stopped (run it again to
continue), 1 a fold's NaN loss, 4 an unexpected error.

The package, by part:

    __main__.py   the command: flags, D prepared, one worker or several, the results once every fold has run
    load.py       checking the config file, the training file, K, the launcher and D, before anything is written
    folds.py      the stratified, seeded fold assignment and the fold files
    folder.py     D's layout and kfold.json, which ties D to one k-fold
    spec.py       the k-fold as a SweepSpec: the fold parameter selects each run's files
    trials.py     the folds queued as the study's trials, and read back as each fold's run
    oof.py        oof_predictions.jsonl, cv.md and ensemble.json
"""
