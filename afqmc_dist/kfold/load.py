"""Checking everything a k-fold depends on before anything is written: the config file, the training file, the
folds, the launcher and the folder D. Every problem is one UserError (exit status 2), and D is left as it was.

The config file is train.py's (`train.py --config FILE`): read and converted as train.py reads it
(arguments.read_config_file, convert_file_values), and the first fold's run options validated as train.py
validates them (RunConfig.validate). It must give `train_file` (the pairs the folds are drawn from) and
`model_checkpoint`. The k-fold sets some options of every run itself, and refuses them in the file rather than
ignore them silently: `dev_file` and `predict_file` (each run's dev fold), `do_predict`, `output_dir`,
`resume_from_checkpoint` and `overwrite_output_dir`. Its `seed`, if any, is the k-fold's seed unless --seed gives
one (it seeds the folds and every run).

The training file is read with the tool's own reader (pairs.py: a bad line is FILE:LINE), and K must not exceed
the count of its rarest label: every dev fold holds at least one pair of each label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UserError
from ..pairs import PairExample, PairSchema, read_pairs
from ..sweep.spec import SET_BY_SWEEP, absolute_paths
from .folder import RUNS_DIR, check_folder
from .folds import assign_folds, rarest_label
from .spec import KFoldSpec

DEFAULT_SEED = 42  # train.py's
# Run options the k-fold sets for every run, or needs left alone, and why (the config file may not give them).
SET_BY_KFOLD = {
    "dev_file": "each run's dev file is its fold (folds/fold-K/dev.json)",
    "max_eval_samples": "every run evaluates its whole dev fold, so that cv.md's fold metrics and out-of-fold "
                        "metrics are over the same pairs",
    "predict_file": "each run predicts its own dev fold",
    "do_predict": "every run predicts its own dev fold",
    **{name: "set by the k-fold for each run (runs/trials/NNNN/seed-S, resuming its own checkpoint)"
       for name in SET_BY_SWEEP if name != "seed"},
}


@dataclass
class KFold:
    """A checked k-fold: what the command runs. `config` holds the config file's run options (converted, paths
    absolute) less the ones the k-fold sets; `fold_of[i]` is the dev fold of the training file's i-th pair."""

    config_path: str
    output_dir: str
    folds: int
    seed: int
    train_file: str
    config: dict
    launcher: list[str]
    heartbeat_interval: int
    grace_period: int
    # Filled in as they are checked (load_kfold):
    train_sha256: str = ""
    label_list: list[str] = field(default_factory=list)
    positive_label: str = ""
    examples: list[PairExample] = field(default_factory=list)
    fold_of: list[int] = field(default_factory=list)
    study_name: str = ""

    @property
    def runs_dir(self) -> str:
        return os.path.join(self.output_dir, RUNS_DIR)

    def identity(self) -> dict:
        """What the folds and their runs depend on (kfold.json; folder.py)."""
        return {"folds": self.folds, "seed": self.seed, "train_file": self.train_file,
                "train_sha256": self.train_sha256, "config": self.config}

    def spec(self) -> KFoldSpec:
        """The sweep the k-fold runs: a grid over the folds, one seed, K trials."""
        metric = self.config.get("metric_for_best_model", "accuracy")
        return KFoldSpec(path=self.config_path, study_name=self.study_name, base=self.config,
                         space=KFoldSpec.fold_space(self.folds), seeds=[self.seed], n_trials=self.folds,
                         objective=f"dev_{metric}", sampler={"type": "grid"}, pruner=None, launcher=self.launcher,
                         heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period,
                         output_dir=self.output_dir)


def load_kfold(args) -> KFold:
    """Check the command's inputs (flags already checked: see __main__.py); UserError on any problem."""
    from ..manifest import file_sha256

    config_path = os.path.abspath(args.config)
    config = read_config(args.config)
    seed = args.seed if args.seed is not None else config.get("seed", DEFAULT_SEED)
    config.pop("seed", None)
    train_file = config.pop("train_file")
    kfold = KFold(config_path=config_path, output_dir=os.path.abspath(args.output_dir), folds=args.folds, seed=seed,
                  train_file=train_file, config=config, launcher=check_launcher(args.launcher),
                  heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period)
    run_config = _validate(args.config, kfold)
    kfold.label_list, kfold.positive_label = list(run_config.label_list), run_config.positive_label
    kfold.examples = read_pairs(train_file, PairSchema.from_config(run_config), require_label=True)
    labels = [example.label for example in kfold.examples]
    label, count = rarest_label(labels, kfold.label_list)
    if args.folds > count:
        raise UserError(f"--folds {args.folds}: {train_file} has {count} pair{'s' * (count != 1)} of label {label!r}, "
                        f"its rarest, and every dev fold needs one of each label: use at most {count} folds")
    kfold.fold_of = assign_folds(labels, args.folds, seed)
    kfold.train_sha256 = file_sha256(train_file)
    kfold.study_name = check_folder(kfold.output_dir, kfold.identity())
    if args.storage:
        from ..sweep.study import make_storage

        make_storage(args.storage)  # reachable, before anything is written (UserError naming it otherwise)
    return kfold


def read_config(path: str) -> dict:
    """The config file's run options, converted as train.py converts them, less those the k-fold sets (UserError
    for any of those, naming the file and the option). `train_file` is required; paths are made absolute."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: not readable")
    from ..arguments import Parser, convert_file_values, read_config_file

    options = convert_file_values(Parser(), read_config_file(path), path)
    for name, why in SET_BY_KFOLD.items():
        if name in options and not (name == "do_predict" and options[name] is True):
            raise UserError(f"{path}: {name}: {why}: leave it out")
    if options.get("do_train", True) is not True:
        raise UserError(f"{path}: do_train: a k-fold trains every fold: leave do_train out or set it to true")
    options.pop("do_train", None)
    options.pop("do_predict", None)
    for name, what in (("train_file", "the pairs the folds are drawn from"),
                       ("model_checkpoint", "the model every fold fine-tunes")):
        if not options.get(name):
            raise UserError(f"{path}: {name} is required ({what})")
    return absolute_paths(options)


def _validate(path: str, kfold: KFold):
    """The first fold's run options validated as train.py validates them (the fold files are not written yet:
    the training file stands in for them, with the same checks); returns the RunConfig."""
    from ..config import RunConfig
    from ..loading import check_folder as check_model_folder
    from ..sweep.runs import trial_dir

    spec = kfold.spec()
    output_dir = os.path.join(trial_dir(kfold.runs_dir, 0), f"seed-{kfold.seed}")
    run_config = RunConfig(**spec.options_for(kfold.train_file, kfold.train_file, kfold.seed, output_dir))
    try:
        run_config.validate()
        # A missing model folder would fail every fold in turn, each after its start-up.
        model = run_config.model_checkpoint
        check_model_folder(model, f"--model_checkpoint {model}", hub_allowed=True)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return run_config


class _LauncherFlag:
    """Stands in for the sweep file's checker in sweep/load.py's launcher check: a problem is the flag's."""

    @staticmethod
    def fail(message: str, *keys) -> UserError:
        return UserError(f"--launcher: {message}")


def check_launcher(value: str | None) -> list[str]:
    """The launcher as a list of words, checked as a sweep file's `launcher` is (its program and the files it names
    exist); the default is this project's `python train.py`."""
    from ..sweep import load

    return load.check_launcher(_LauncherFlag(), value)
