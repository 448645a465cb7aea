"""Command line and config files -> RunConfig: grouped --help, plain switches, one-line errors that name the fix.

    python train.py --model_checkpoint bert-base-chinese --train_file train.json ... --do_train
    python train.py run.yaml                           # everything from a file
    python train.py --config run.yaml --seed 7         # a file, with flags overriding it

The flags are RunConfig's fields (config.py), added by transformers' HfArgumentParser; on top of it: the options
come in groups in --help, booleans are plain switches (`--do_train`, `--no_group_by_length`; a config file still
says `do_train: true`), a mistyped option or config key is named with the closest real one, and a negative number
(`--learning_rate -1e-3`) reaches the validation that explains what is wrong with it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from typing import get_type_hints

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .config import GROUPS as GROUP_TITLES
from .config import RunConfig
from .errors import UserError, closest_option, first_line

DESCRIPTION = ("Fine-tune a Chinese BERT-family model on a sentence-pair task (AFQMC by default; LCQMC, BQ, OCNLI "
               "with the key and label options): train, test on labelled pairs, predict.")
USAGE = "python train.py [CONFIG.yaml] [--config FILE] [OPTIONS]   (accelerate launch ... train.py for many processes)"
EXAMPLES = """examples:
  python train.py --model_checkpoint bert-base-chinese --train_file train.json --dev_file dev.json \\
      --output_dir outputs/afqmc --do_train
  python train.py run.yaml                          # every option from a YAML/JSON file
  python train.py --config run.yaml --seed 7        # the file, with flags on top
  launch/cpu_debug.sh ...                           # the same through accelerate launch (see launch/)
  python train.py --output_dir outputs/afqmc --test_file test.json --do_test     # test a trained run
"""


def groups() -> dict[str, list[str]]:
    """Every RunConfig field by the --help group it declares (config.option), in the order of config.GROUPS."""
    fields = dataclasses.fields(RunConfig)
    return {title: [f.name for f in fields if f.metadata["group"] == title] for title in GROUP_TITLES}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples stay as lines; each option states its default once (unless its help already says it); the
    `--dashed-spelling` that HfArgumentParser accepts for every `--underscored_option` is not listed twice."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        options = [o for o in action.option_strings if "-" not in o[2:]]
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{option} {metavar}" if i == 0 else option for i, option in enumerate(options))

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if isinstance(action, argparse._StoreTrueAction) and default is True:
            return f"{text} (default: on)"
        if "default" in text.lower() or not action.option_strings or default in (None, False, argparse.SUPPRESS) \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


class Parser(HfArgumentParser):
    """HfArgumentParser with option groups, switches for booleans, and errors as one line (a UserError)."""

    def __init__(self):
        super().__init__(RunConfig, usage=USAGE, description=DESCRIPTION, epilog=EXAMPLES,
                         formatter_class=HelpFormatter, allow_abbrev=False)
        self.add_argument("--config", help="YAML or JSON file of options; flags given on the command line win.")

    def _add_dataclass_arguments(self, dtype):
        hints = get_type_hints(dtype)
        fields = {f.name: f for f in dataclasses.fields(dtype)}
        for title, names in groups().items():
            group = self.add_argument_group(f"{title} options")
            for name in names:
                # HfArgumentParser passes a field's metadata on to add_argument: only what argparse takes.
                f = copy.copy(fields[name])
                f.metadata = {key: f.metadata[key] for key in ("help", "aliases") if f.metadata.get(key)}
                f.type = hints[name]
                if f.type is bool or f.type == bool | None:
                    _add_switch(group, f)
                else:
                    self._parse_dataclass_field(group, f)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _add_switch(group, f) -> None:
    """`--name` sets True; `--no_name` sets False (offered when the default is True, or None: 'decide for me')."""
    help_text = f.metadata.get("help", "")
    group.add_argument(f"--{f.name}", action="store_true", default=f.default, help=help_text)
    if f.default is not False:
        group.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=f"Turn --{f.name} off.")


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _join_negative_numbers(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--learning_rate -1e-3` -> `--learning_rate=-1e-3`: argparse takes `-1e-3` for an option (it only knows
    plain negative integers and decimals) and would say "expected one argument"; validation says what is wrong."""
    takes_value = {option for action in parser._actions if action.nargs != 0 for option in action.option_strings}
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] in takes_value and token.startswith("-") and _is_number(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_config_file(path: str) -> dict:
    """The options of a YAML/JSON config file; UserError naming the file (and the closest option to a typo)."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                        f"{first_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values")
    known = [f.name for f in dataclasses.fields(RunConfig)]
    for key in data:
        if key not in known:
            raise UserError(f"{path}: unknown option {key!r}{closest_option(str(key), known)}")
    return data


def convert_file_values(parser: argparse.ArgumentParser, data: dict, path: str) -> dict:
    """Give the file's values each option's type and check its choices, as argparse does for flags.

    argparse leaves non-string defaults as they are, and checks no default against `choices`: YAML's
    `label_list: [0, 1]` would stay numbers (and match no label of the data) and `head: bogus` would pass.
    """
    actions = {action.dest: action for action in parser._actions if action.option_strings
               and not action.option_strings[0].startswith("--no_")}
    converted = {}
    for key, value in data.items():
        action = actions[key]
        convert = string_to_bool if isinstance(action, argparse._StoreTrueAction) else action.type
        if value is not None and convert is not None:
            multiple = action.nargs in ("+", "*")
            items = value if multiple and isinstance(value, list) else [value]
            if convert is not string_to_bool and any(isinstance(v, bool) for v in items):
                raise UserError(f"{path}: {key}: {value!r} is not a valid value (YAML reads unquoted yes/no/on/off "
                                "as true/false: quote it)")
            try:
                items = [convert(v if isinstance(v, (str, bool)) else str(v)) for v in items]
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise UserError(f"{path}: {key}: invalid value {value!r}") from None
            value = items if multiple else items[0]
            if action.choices is not None and value not in action.choices:
                allowed = ", ".join(repr(c) for c in action.choices)
                raise UserError(f"{path}: {key}: {value!r} is not one of {allowed}")
        converted[key] = value
    return converted


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse flags (and an optional YAML/JSON file given as `--config FILE` or as the only argument), validate.

    Values on the command line override the file's. Raises UserError on any problem.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = ["--config", argv[0]]
    parser = Parser()
    argv = _join_negative_numbers(argv, parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**convert_file_values(parser, read_config_file(known.config), known.config))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0].split("=", 1)[0]
        if first.startswith("-"):
            raise UserError(f"unknown option {first}{closest_option(first, _option_strings(parser))} (see --help)")
        raise UserError(f"unexpected argument {first!r} (options start with --; see --help)")
    values = vars(namespace)
    values.pop("config", None)
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg
