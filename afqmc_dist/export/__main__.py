"""`python -m afqmc_dist.export --model OUTPUT_DIR/best --output_dir EXPORT [--quantize int8] [--check_file FILE]
[--max_accuracy_drop 0.005]`: see the package docstring (afqmc_dist/export/__init__.py) and docs/export.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from ..errors import CommandParser, UserError, log_errors_to
from ..outputs import RUN_CONFIG
from ..pairs import PairSchema
from ..preemption import run_command
from .folder import check_output_dir, staged_export

DEFAULT_MAX_DROP = 0.005
OPTIONAL = ("onnx", "onnxruntime", "onnxscript")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from . import __doc__ as description

    parser = CommandParser(prog="python -m afqmc_dist.export", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder written by the tool (OUTPUT_DIR/best)")
    parser.add_argument("--output_dir", required=True, help="the export's folder: new, empty or an earlier export")
    parser.add_argument("--quantize", choices=["int8"], help="int8: ONNX Runtime's dynamic quantization, kept only "
                        "if the accuracy on the check file drops by at most --max_accuracy_drop")
    parser.add_argument("--check_file", help="JSON-lines pairs to check the export on (default: the run's dev file, "
                        f"from {RUN_CONFIG} beside --model)")
    parser.add_argument("--max_accuracy_drop", type=float, default=DEFAULT_MAX_DROP, help="the accuracy an int8 "
                        f"export may lose on the check file, as a fraction (default {DEFAULT_MAX_DROP})")
    parser.add_argument("--max_seq_length", type=int, help="tokens per pair (default: the run's, else 128)")
    parser.add_argument("--batch_size", type=int, default=64, help="pairs per batch of the check (default 64)")
    for key in ("sentence1", "sentence2", "label"):
        parser.add_argument(f"--{key}_key", help=f"JSON key of the {key.replace('sentence', 'sentence ')} in the "
                            "check file (default: the run's)")
    args = parser.parse_args(argv)
    if not 0 <= args.max_accuracy_drop <= 1:
        raise UserError(f"--max_accuracy_drop must be between 0 and 1 (a fraction), got {args.max_accuracy_drop}")
    if args.batch_size < 1 or (args.max_seq_length is not None and args.max_seq_length < 8):
        raise UserError("--batch_size must be > 0 and --max_seq_length at least 8")
    return args


def run_config_of(model: str) -> dict:
    """The training run's options when --model is OUTPUT_DIR/best (OUTPUT_DIR/run_config.json), else {}."""
    path = os.path.join(os.path.dirname(os.path.abspath(model)), RUN_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            options = json.load(f)
    except (OSError, ValueError):
        return {}
    return options if isinstance(options, dict) else {}


@dataclass
class Plan:
    """What the export reads, resolved from the flags and the run's options before anything heavy happens."""

    check_file: str
    schema: PairSchema
    max_seq_length: int


def resolve(args: argparse.Namespace) -> Plan:
    """The check file and how to read it: flags first, then the run's options, then the tool's defaults."""
    if not os.path.isdir(args.model):
        what = "is a file, not a model folder" if os.path.exists(args.model) else "no such folder"
        raise UserError(f"--model {args.model}: {what}")
    run = run_config_of(args.model)
    check_file = args.check_file or run.get("dev_file")
    if not check_file:
        raise UserError(f"--check_file is needed: {args.model} has no {RUN_CONFIG} beside it naming the run's dev "
                        "file, and the export is only written once checked on labelled or unlabelled pairs")
    if not os.path.isfile(check_file):
        source = "--check_file" if args.check_file else f"the run's dev_file (in {RUN_CONFIG}; pass --check_file)"
        raise UserError(f"{source} {check_file}: no such file")
    keys = {key: getattr(args, key) or run.get(key) or key.removesuffix("_key")
            for key in ("sentence1_key", "sentence2_key", "label_key")}
    schema = PairSchema(**keys)  # the label list comes from the model's config once it is loaded
    return Plan(check_file, schema, args.max_seq_length or run.get("max_seq_length") or 128)


def require_packages() -> None:
    import importlib.util

    missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"exporting needs {', '.join(missing)}, not installed: pip install 'afqmc-dist[export]'")


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_output_dir(args.output_dir)
    plan = resolve(args)
    require_packages()
    log_errors_to(os.path.dirname(os.path.abspath(args.output_dir)))
    # Flags, files and packages are checked: now the seconds of torch, transformers and the exporter.
    from .steps import export_checked

    started = time.perf_counter()
    with staged_export(args.output_dir) as folder:
        report = export_checked(args, plan, folder)
    check = report["check"]
    accuracy = (f", accuracy {check['accuracy_trained']:.4f} -> {check['accuracy_exported']:.4f}"
                if check["labelled"] else "")
    print(f"exported {args.model} ({report['precision']}) to {args.output_dir} in {time.perf_counter() - started:.0f}"
          f" s: on {check['pairs']} pairs of {plan.check_file}, labels agree on {check['label_agreement']:.2%}, "
          f"probabilities within {check['max_prob_diff']:.1e}{accuracy}; {check['pairs_per_second_exported']:.0f} "
          f"pairs/s against {check['pairs_per_second_trained']:.0f} (torch)")


def main(argv: list[str] | None = None) -> int:
    """Export; return the exit status (2 for bad input or a refused export, one `error:` line; nothing written)."""
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
