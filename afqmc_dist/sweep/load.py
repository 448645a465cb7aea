"""Reading a sweep file: every key checked, every problem one UserError naming the file, the line and the key.

What the file holds is described in spec.py. The run options are checked as train.py checks its config file
(arguments.convert_file_values, RunConfig.validate), for the base and for both ends of every range and every
choice; the sampler's and pruner's arguments against the types of the Optuna class; a grid's size is counted (not
listed) and capped; the launcher's program and the files it names must exist. Nothing is written.
"""

from __future__ import annotations

import inspect
import math
import os
import shlex
import shutil
import sys

import yaml

from ..config import RunConfig
from ..errors import UserError, closest_option, first_line
from .spec import (
    CATEGORICAL_TYPES,
    GRACE_RANGE,
    HEARTBEAT_RANGE,
    KEYS,
    MAX_GRID,
    OBJECTIVES,
    OPTIONS,
    PRUNERS,
    ROOT,
    SAMPLERS,
    SET_BY_SWEEP,
    Param,
    SweepSpec,
)


class _Lines:
    """Line numbers of the keys of a YAML file, so that every message can say where: `lines.of("base", "seed")`."""

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        try:
            node = yaml.compose(text)
        except yaml.YAMLError:
            return
        self._walk(node, ())

    def _walk(self, node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[(*path, key.value)] = key.start_mark.line + 1
                self._walk(value, (*path, key.value))

    def of(self, *path) -> int | None:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)


class _Checker:
    """Reads one sweep file; `fail(message, *key path)` raises the UserError, with the file and line."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such sweep file")
        try:
            with open(path, encoding="utf-8") as f:
                self.text = f.read()
            self.data = yaml.safe_load(self.text)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read it ({first_line(e)})") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {first_line(e)}") from None
        self.lines = _Lines(self.text)

    def fail(self, message: str, *keys) -> UserError:
        line = self.lines.of(*keys)
        where = f"{self.path}:{line}" if line else self.path
        return UserError(f"{where}: {': '.join(map(str, keys))}{': ' if keys else ''}{message}")


def _unknown(name: str, known) -> str:
    return f"unknown {'option' if known is OPTIONS else 'key'} {name!r}{closest_option(name, list(known))}"


def load_sweep(path: str, sweep_dir: str) -> SweepSpec:
    """Read and check the sweep file at `path` for a sweep in `sweep_dir`. Writes nothing; UserError on any
    problem."""
    c = _Checker(path)
    data = c.data
    if not isinstance(data, dict):
        raise c.fail("expected a mapping of keys (base, search_space, seeds, ...)")
    for key in data:
        if key not in KEYS:
            raise c.fail(_unknown(str(key), KEYS), key)
    from ..arguments import Parser  # transformers' HfArgumentParser: imported once the file has been read

    parser = Parser()

    base = _check_options(c, parser, data.get("base") or {})
    space = _check_space(c, parser, data.get("search_space"), base)
    seeds = data.get("seeds", [42])  # train.py's default seed
    if not (isinstance(seeds, list) and seeds and all(type(s) is int and 0 <= s < 2**32 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise c.fail(f"expected a list of distinct whole numbers from 0 to {2**32 - 1}, got {seeds!r}", "seeds")
    objective = data.get("objective", "dev_accuracy")
    if objective not in OBJECTIVES:
        raise c.fail(f"{objective!r} is not one of {', '.join(OBJECTIVES)}", "objective")
    study_name = data.get("study_name") or os.path.basename(os.path.normpath(os.path.abspath(sweep_dir)))
    if not (isinstance(study_name, str) and all(ch.isalnum() or ch in "_-." for ch in study_name)):
        raise c.fail(f"{study_name!r}: use letters, digits, '_', '-' or '.'", "study_name")
    for key, (low, high) in (("heartbeat_interval", HEARTBEAT_RANGE), ("grace_period", GRACE_RANGE)):
        if key in data and not (type(data[key]) is int and low <= data[key] <= high):
            raise c.fail(f"expected a whole number of seconds from {low} to {high}, got {data[key]!r}", key)
    heartbeat, grace = data.get("heartbeat_interval", 60), data.get("grace_period", 180)
    if grace <= heartbeat:
        raise c.fail(f"{grace} must be longer than heartbeat_interval ({heartbeat}), or live trials would be "
                     "taken for dead", "grace_period")

    sampler = _check_component(c, "sampler", data.get("sampler", "tpe"), SAMPLERS, "samplers")
    pruner = _check_component(c, "pruner", data.get("pruner", "none"), PRUNERS, "pruners")
    grid_size = _grid_size(c, space) if sampler["type"] == "grid" else None
    n_trials = data.get("n_trials", grid_size)
    if n_trials is None:
        raise c.fail("n_trials is required (a grid's default is its size)")
    if not (type(n_trials) is int and 1 <= n_trials <= MAX_GRID):
        raise c.fail(f"expected a number of trials from 1 to {MAX_GRID}, got {n_trials!r}", "n_trials")
    if grid_size is not None and n_trials > grid_size:
        raise c.fail(f"{n_trials} is more than the grid's {grid_size} configurations", "n_trials")

    spec = SweepSpec(path=os.path.abspath(path), study_name=study_name, base=base, space=space, seeds=seeds,
                     n_trials=n_trials, objective=objective, sampler=sampler, pruner=pruner,
                     launcher=check_launcher(c, data.get("launcher")), heartbeat_interval=heartbeat,
                     grace_period=grace)
    try:  # the sampler's arguments were checked by name; now their values
        spec.make_sampler()
    except (TypeError, ValueError) as e:
        raise c.fail(first_line(e), "sampler") from None
    _check_with_train_py(c, spec, sweep_dir)
    return spec


def _check_options(c: _Checker, parser, options) -> dict:
    """The `base` run options, converted as train.py converts its config file's values."""
    from ..arguments import convert_file_values

    if not isinstance(options, dict):
        raise c.fail("expected a mapping of run options (as in train.py's config file)", "base")
    converted = {}
    for key, value in options.items():
        if key not in OPTIONS:
            raise c.fail(_unknown(str(key), OPTIONS), "base", key)
        if key in SET_BY_SWEEP:
            raise c.fail("set by the sweep for each run (trials/NNNN/seed-S, the seeds list, resuming its own "
                         "checkpoint): leave it out", "base", key)
        if key == "do_train" and value is not True:
            raise c.fail("a sweep trains: leave do_train out or set it to true", "base", key)
        try:
            converted.update(convert_file_values(parser, {key: value}, "base"))
        except UserError as e:
            raise c.fail(str(e).removeprefix(f"base: {key}: "), "base", key) from None
    return converted


def _check_space(c: _Checker, parser, space, base: dict) -> list[Param]:
    if not isinstance(space, dict) or not space:
        raise c.fail("expected a mapping of run options to ranges or choices (at least one)", "search_space")
    actions = {action.dest: action for action in parser._actions if action.option_strings
               and not action.option_strings[0].startswith("--no_")}
    params = []
    for name, entry in space.items():
        if name not in OPTIONS:
            raise c.fail(_unknown(str(name), OPTIONS), "search_space", name)
        if name in SET_BY_SWEEP or name == "do_train":
            raise c.fail("set by the sweep for each run: it cannot be searched (seeds go in `seeds`)",
                         "search_space", name)
        if name in base:
            raise c.fail("also set in base: give it in one place", "search_space", name)
        if isinstance(entry, list):
            entry = {"type": "categorical", "choices": entry}
        if not isinstance(entry, dict):
            raise c.fail("expected {type: float|int|categorical, ...} or a list of choices", "search_space", name)
        params.append(_check_param(c, name, dict(entry), actions[name], parser))
    return params


def _check_param(c: _Checker, name: str, entry: dict, action, parser) -> Param:
    kind = entry.pop("type", None)
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}}
    if kind not in allowed:
        raise c.fail(f"type {kind!r} is not one of float, int, categorical", "search_space", name)
    for key in entry:
        if key not in allowed[kind]:
            raise c.fail(_unknown(str(key), sorted(allowed[kind])), "search_space", name, key)
    takes = {float: "float", int: "int"}.get(action.type)
    multiple = action.nargs in ("+", "*")

    def convert(value, key):
        """A value as train.py reads it from a config file (type, choices)."""
        from ..arguments import convert_file_values

        try:
            return convert_file_values(parser, {name: value}, "v")[name]
        except UserError as e:
            raise c.fail(str(e).removeprefix(f"v: {name}: "), "search_space", name, key) from None

    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise c.fail("choices must be a non-empty list", "search_space", name, "choices")
        if multiple or not all(isinstance(v, CATEGORICAL_TYPES) for v in choices):
            raise c.fail("choices must be numbers, strings, booleans or null (a list-valued option cannot be "
                         "searched)", "search_space", name, "choices")
        converted = [convert(v, "choices") for v in choices]
        if len({repr(v) for v in converted}) < len(converted):
            raise c.fail(f"choices repeat a value: {choices}", "search_space", name, "choices")
        return Param(name, "categorical", choices=tuple(converted))

    if takes != kind:
        raise c.fail(f"--{name} takes {takes or 'non-numeric'} values: use "
                     f"{'type ' + takes + ' or ' if takes else ''}a list of choices", "search_space", name, "type")
    for key in ("low", "high"):
        if key not in entry:
            raise c.fail(f"a {kind} range needs low and high", "search_space", name)
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and type(value) is not int):
            raise c.fail(f"expected a{'n integer' if kind == 'int' else ' number'}, got {value!r}",
                         "search_space", name, key)
    low, high = convert(entry["low"], "low"), convert(entry["high"], "high")
    log, step = entry.get("log", False), entry.get("step")
    if low > high:
        raise c.fail(f"low {low} > high {high}: an empty range", "search_space", name)
    if low == high:
        raise c.fail(f"low == high ({low}): a range of one value; put it in base", "search_space", name)
    if not isinstance(log, bool):
        raise c.fail(f"expected true or false, got {log!r}", "search_space", name, "log")
    if log and low <= 0:
        raise c.fail(f"a log range needs low > 0, got {low}", "search_space", name, "low")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 \
                or (kind == "int" and type(step) is not int):
            raise c.fail(f"expected a positive {kind}, got {step!r}", "search_space", name, "step")
        if log:
            raise c.fail("step and log cannot be combined", "search_space", name, "step")
    return Param(name, kind, low=low, high=high, step=step, log=log)


def _grid_size(c: _Checker, space: list[Param]) -> int:
    """The number of configurations of a grid over `space`, counted without listing them (capped)."""
    size = 1
    for param in space:
        count = param.grid_size()
        if count is None:
            raise c.fail("a grid needs a step for a float range (or a list of choices)", "search_space", param.name)
        size *= count
        if size > MAX_GRID:
            raise c.fail(f"the grid has more than {MAX_GRID} configurations (Optuna lists a grid in memory): "
                         "use a larger step, fewer choices, or the tpe or random sampler", "search_space",
                         param.name)
    return size


# What a sweep file can give an Optuna argument annotated with these types (YAML has no callables or arrays).
_YAML_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


def _argument_problem(parameter, value) -> str | None:
    """Why `value` (from YAML) does not suit the Optuna class's `parameter`, or None."""
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [part.strip() for part in text.split("|")]
    if any(kind not in _YAML_TYPES for kind in kinds):
        return f"takes a {text}, which a sweep file cannot give"
    fits = any(isinstance(value, _YAML_TYPES[kind]) and not (isinstance(value, bool) and kind in ("int", "float"))
               for kind in kinds)
    if not fits:
        return f"expected {' or '.join(kinds)}, got {value!r}"
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**32:
        return f"expected a whole number from 0 to {2**32 - 1}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    return None


def _check_component(c: _Checker, key: str, value, names: dict, module: str) -> dict | None:
    """A sampler or pruner entry -> {"type": NAME, **arguments}, the arguments checked against the Optuna class."""
    if value in (None, "none") and key == "pruner":
        return None
    entry = {"type": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else None
    choices = ", ".join(names) + (", none" if key == "pruner" else "")
    if entry is None or entry.get("type") not in names:
        raise c.fail(f"{value!r} is not one of {choices} (or {{type: NAME, ...arguments}})", key)
    import optuna

    cls = getattr(getattr(optuna, module), names[entry["type"]])
    parameters = {name: p for name, p in inspect.signature(cls).parameters.items() if name != "search_space"}
    for arg, given in entry.items():
        if arg == "type":
            continue
        if arg not in parameters:
            raise c.fail(f"{cls.__name__} takes no argument {arg!r} (it takes {', '.join(sorted(parameters))})", key,
                         arg)
        problem = _argument_problem(parameters[arg], given)
        if problem:
            raise c.fail(f"{cls.__name__}: {problem}", key, arg)
    try:  # built once here so that a bad value is found now, not by the first trial
        if key == "pruner":
            cls(**{k: v for k, v in entry.items() if k != "type"})
    except (TypeError, ValueError) as e:
        raise c.fail(f"{cls.__name__}: {first_line(e)}", key) from None
    return entry


def check_launcher(c: _Checker, value) -> list[str]:
    """The launcher command as a list. `python` at its start is the interpreter running the sweep, and a program
    not on PATH is looked for beside it (a virtual environment's `accelerate`); the default is `python train.py`
    (this project's). Its program must be found, and the files it names must exist. (k-fold's --launcher is
    checked here too: `c` is anything with the checker's `fail(message, *keys) -> UserError`.)"""
    if value is None:
        return [sys.executable, os.path.join(ROOT, "train.py")]
    if isinstance(value, str):
        try:
            command = shlex.split(value)
        except ValueError as e:
            raise c.fail(f"cannot split it into words: {e}", "launcher") from None
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        command = list(value)
    else:
        raise c.fail("expected a command line (a string or a list of words)", "launcher")
    if not command:
        raise c.fail("empty command", "launcher")
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    beside_python = os.path.join(os.path.dirname(sys.executable), command[0])
    if os.sep not in command[0] and not shutil.which(command[0]) and shutil.which(beside_python):
        command[0] = beside_python  # e.g. `accelerate` of the environment running the sweep, not activated
    if not (shutil.which(command[0]) or (os.path.isfile(command[0]) and os.access(command[0], os.X_OK))):
        raise c.fail(f"{command[0]}: no such program (not on PATH, not an executable file)", "launcher")
    for word in command[1:]:
        if word.endswith((".py", ".sh", ".yaml", ".yml", ".json")) and not word.startswith("-") \
                and not os.path.isfile(word):
            raise c.fail(f"{word}: no such file (relative paths start from {os.getcwd()})", "launcher")
    if any(word in ("--config", "--output_dir") for word in command):
        raise c.fail("the sweep passes each run's options (--config FILE): give run options in base",
                     "launcher")
    return command


def _check_with_train_py(c: _Checker, spec: SweepSpec, sweep_dir: str) -> None:
    """Validate the run options of the first seed's run as train.py does: the base with every searched option at
    its first value, then every other end of a range and every other choice in turn. The model folder too: a
    missing one would otherwise fail every trial in turn, each after its start-up."""
    from ..loading import check_folder  # after the flags: it imports transformers

    first = {p.name: p.corner_values()[0] for p in spec.space}
    probes = [(None, first)]
    for param in spec.space:
        probes += [(param, {**first, param.name: value}) for value in param.corner_values()[1:]]
    output_dir = os.path.join(sweep_dir, "trials", "0000", f"seed-{spec.seeds[0]}")
    for param, values in probes:
        options = spec.run_options(values, spec.seeds[0], output_dir)
        try:
            RunConfig(**options).validate()
            model = options["model_checkpoint"]
            check_folder(model, f"--model_checkpoint {model}", hub_allowed=True)
        except UserError as e:
            if param is None:
                named = [p for p in spec.space if f"--{p.name} " in f"{e} "]
                if named:
                    raise c.fail(f"{named[0].name} = {values[named[0].name]!r}: {e}", "search_space",
                                 named[0].name) from None
                keys = [k for k in spec.base if f"--{k} " in f"{e} " or f"--{k}:" in f"{e}"]
                raise c.fail(str(e), "base", *keys[:1]) from None
            raise c.fail(f"{param.name} = {values[param.name]!r}: {e}", "search_space", param.name) from None
