"""The sweep file: what a study searches and how its trials run, read and checked in full before anything is written.

    study_name: afqmc-bert-base        # optional; default: the sweep folder's name
    base:                              # run options, exactly as in train.py's config file
      model_checkpoint: bert-base-chinese
      train_file: data/afqmc_public/train.json
      dev_file: data/afqmc_public/dev.json
      checkpointing_steps: "500"
    search_space:                      # any run option
      learning_rate: {type: float, low: 1.0e-5, high: 5.0e-5, log: true}    # step: for a grid
      num_train_epochs: {type: int, low: 2, high: 3}
      batch_size: [16, 32]             # a list is short for {type: categorical, choices: [...]}
    seeds: [1, 2, 3]                   # every trial runs once per seed; its value is the mean
    sampler: tpe                       # grid | random | tpe, or {type: tpe, seed: 0, ...} (Optuna's arguments)
    n_trials: 12                       # a grid's default: its size
    objective: dev_accuracy            # dev_f1 | dev_loss (minimised)
    pruner: none                       # median | percentile | hyperband | successive_halving, or {type: ..., ...}
    launcher: python train.py          # or e.g. accelerate launch --config_file accelerate_config.yaml ... train.py
    heartbeat_interval: 60             # seconds between a running trial's heartbeats (1 .. 3600)
    grace_period: 180                  # a trial with no heartbeat for this long is stale: it is run again

load.py reads and checks it (`load_sweep`). Paths in the run options are made absolute, so that a launcher that
changes folder still finds them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's folder
KEYS = ("study_name", "base", "search_space", "seeds", "sampler", "n_trials", "objective", "pruner", "launcher",
        "heartbeat_interval", "grace_period")
# objective -> (the dev metric, the study's direction)
OBJECTIVES = {"dev_accuracy": ("accuracy", "maximize"), "dev_f1": ("f1", "maximize"),
              "dev_loss": ("loss", "minimize")}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
# The sweep file's pruner names and the Optuna classes they stand for.
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "hyperband": "HyperbandPruner",
           "successive_halving": "SuccessiveHalvingPruner"}
MAX_GRID = 1_000_000  # configurations: a grid is enumerated by Optuna, in memory
HEARTBEAT_RANGE, GRACE_RANGE = (1, 3600), (2, 86_400)  # seconds
# Options every trial run gets from the sweep: its folder, its seed, resuming its own checkpoint.
SET_BY_SWEEP = ("output_dir", "seed", "resume_from_checkpoint", "overwrite_output_dir")
PATH_OPTIONS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("path"))
OPTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))
CATEGORICAL_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Param:
    """One searched run option: a float or int range (optionally log-scaled or stepped), or a list of choices."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        cls = FloatDistribution if self.kind == "float" else IntDistribution
        return cls(self.low, self.high, log=self.log, step=self.step if self.step is not None else
                   (None if self.kind == "float" else 1))

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)

    def grid_size(self) -> int | None:
        """How many values a grid takes (counted, not listed), or None for a continuous range (no step)."""
        if self.kind == "categorical":
            return len(self.choices)
        if self.step is None and self.kind == "float":
            return None
        step = self.step or 1
        return int((self.high - self.low + 1e-12 * abs(step)) // step) + 1

    def grid_values(self) -> list | None:
        """The values a grid takes, or None for a continuous range (no step). Check `grid_size` first."""
        if self.kind == "categorical":
            return list(self.choices)
        count = self.grid_size()
        if count is None:
            return None
        step = self.step or 1
        return [self.low + i * step if self.kind == "int" else round(self.low + i * step, 12) for i in range(count)]

    def corner_values(self) -> list:
        """The values checked against train.py's validation: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "categorical":
            return "one of " + ", ".join(map(str, self.choices))
        extra = (" (log)" if self.log else "") + (f" step {self.step}" if self.step is not None else "")
        return f"{self.kind} {self.low} .. {self.high}{extra}"

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v is not None and v is not False and v != ()}


@dataclass
class SweepSpec:
    """A checked sweep file. `base` holds converted run option values; `launcher` the command a run starts with
    (its options follow as `--config FILE`)."""

    path: str
    study_name: str
    base: dict
    space: list[Param]
    seeds: list[int]
    n_trials: int
    objective: str = "dev_accuracy"
    sampler: dict = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict | None = None
    launcher: list[str] = field(default_factory=list)
    heartbeat_interval: int = 60
    grace_period: int = 180

    @property
    def metric(self) -> str:
        return OBJECTIVES[self.objective][0]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][1]

    def identity(self) -> dict:
        """What a study's trials depend on: a study made from another sweep file that differs here is refused.
        (n_trials, the launcher and the heartbeat settings may change between runs of the same study.)"""
        return {"base": self.base, "search_space": [p.as_dict() for p in self.space], "seeds": self.seeds,
                "objective": self.objective, "sampler": self.sampler, "pruner": self.pruner}

    @property
    def sampler_seed(self) -> int | None:
        """The sampler's `seed` in the sweep file, or None (Optuna then seeds it at random)."""
        seed = self.sampler.get("seed")
        return seed if isinstance(seed, int) else None

    def make_sampler(self, seed: int | None = None):
        """The study's sampler; `seed` replaces the sweep file's (each worker process draws with its own: see
        study.claim_sampler_seed)."""
        import optuna

        kwargs = {k: v for k, v in self.sampler.items() if k != "type"}
        if seed is not None:
            kwargs["seed"] = seed
        if self.sampler["type"] == "grid":
            kwargs["search_space"] = {p.name: p.grid_values() for p in self.space}
        return getattr(optuna.samplers, SAMPLERS[self.sampler["type"]])(**kwargs)

    def make_pruner(self):
        """The study's pruner (Optuna's NopPruner with `pruner: none`)."""
        return make_pruner(self.pruner)

    def run_options(self, params: dict, seed: int, output_dir: str) -> dict:
        """The options of one seed's training run (what its config file holds)."""
        options = {**self.base, **params, "do_train": True, "seed": seed, "output_dir": os.path.abspath(output_dir),
                   "resume_from_checkpoint": "latest"}
        options.setdefault("metric_for_best_model", self.metric)
        return absolute_paths(options)


def make_pruner(entry: dict | None):
    """The Optuna pruner for a sweep file's `pruner` entry: {"type": NAME, **keyword arguments of its class}."""
    import optuna

    if entry is None:
        return optuna.pruners.NopPruner()
    kwargs = {k: v for k, v in entry.items() if k != "type"}
    return getattr(optuna.pruners, PRUNERS[entry["type"]])(**kwargs)


def absolute_paths(options: dict) -> dict:
    """`options` with every path option that names an existing file or folder made absolute."""
    return {k: os.path.abspath(v) if k in PATH_OPTIONS and isinstance(v, str) and v != "none" and os.path.exists(v)
            else v for k, v in options.items()}
