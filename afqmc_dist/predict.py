r"""Predict with a trained model: one pair from the command line, or a JSON-lines file of any size.

    python -m afqmc_dist.predict --model OUTPUT_DIR/best "花呗如何还款" "花呗怎么还钱"
    python -m afqmc_dist.predict --model OUTPUT_DIR/best --input pairs.json --output preds.jsonl
    python -m afqmc_dist.predict --model OUTPUT_DIR/best --input pairs.json --output - | jq .pred_label
    python -m afqmc_dist.predict --model RUN1/best RUN2/best --input pairs.json --output preds.jsonl  # an ensemble
    python -m afqmc_dist.predict --model EXPORT --input pairs.json --output preds.jsonl   # ONNX Runtime (export)
    accelerate launch --config_file accelerate_config.yaml --multi_gpu --num_processes 4 \
        -m afqmc_dist.predict --model OUTPUT_DIR/best --input pairs.json --output preds.jsonl   # a large file

A pair prints one line on stdout, `LABEL<TAB>PROB`: the predicted label (from the model's id2label) and its
probability with 6 decimals, e.g. `1<TAB>0.973112`. A file gives what `--do_predict` gives: OUTPUT holds every input
line, in input order, with `pred_label` and `pred_prob` added; when every line has an id, CLUE's
`afqmc_predict.json` is written beside it. `--output -` writes the same lines to stdout instead (no CLUE file), in
input order as they are made, for pipelines: messages and progress go to stderr.

A file is streamed (inference/): a first pass checks every line (as the tool's data files are; labels are not
needed) before the model is loaded, holding nothing; then the model runs over it in pieces of --piece_size pairs,
written as they are done into OUTPUT.parts/ beside OUTPUT. Memory does not grow with the file. A prediction
stopped in any way (SIGKILL, SIGTERM, Ctrl-C, a full disk, a lost node) continues when the same command runs
again, on any number of processes: complete pieces are kept, and OUTPUT is byte for byte what one uninterrupted
process writes. OUTPUT and the CLUE file appear whole, once every piece is done; OUTPUT.parts/ is then removed.
Pieces of another model, input or setting are refused (--restart discards them).

Several --model folders (or a k-fold folder, or a sweep folder: its best trial's runs) predict as an ensemble: each
pair's probabilities are the mean of the members' (ensemble.py), and OUTPUT and the CLUE file hold the ensemble's
predictions.

Errors are one `error: ...` line on stderr, exit status 2, and nothing is written: a folder that is not a model
trained by the tool (a base checkpoint has no trained classifier), a bad input line (FILE:LINE; ids must be
unique), a sentence on the command line that is not UTF-8 text. An unexpected error is one line too, exit status
4, with its traceback in error.log beside OUTPUT (in the current folder for a pair or `--output -`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import DEFAULT_EVAL_BATCH, RunConfig
from .ensemble import members
from .errors import CommandParser, UserError, log_errors_to
from .files import make_missing_dirs, remove_empty_dirs
from .pairs import PairSchema, unencodable
from .preemption import run_command

STDOUT = "-"
PIECE_SIZE = 10_000  # pairs per piece: what a rerun recomputes at most, per process


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """The flags, checked, and the RunConfig that the tool's data, loader and accelerator code expect."""
    parser = CommandParser(prog="python -m afqmc_dist.predict", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair", nargs="*", metavar="SENTENCE", help="the two sentences of one pair")
    parser.add_argument("--model", required=True, nargs="+", metavar="FOLDER",
                        help="a folder written by the tool (OUTPUT_DIR/best), or an export of one (python -m "
                        "afqmc_dist.export: run by ONNX Runtime); several, or a k-fold or sweep folder: an ensemble, "
                        "their probabilities averaged")
    parser.add_argument("--input", help="JSON-lines file of pairs, instead of two sentences")
    parser.add_argument("--output", help="the JSON-lines file the predictions of --input go to (its folder is "
                        "created if needed), or - for stdout")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_EVAL_BATCH, help="pairs per batch and process "
                        f"(default {DEFAULT_EVAL_BATCH}; batches go by length, so big ones waste little)")
    parser.add_argument("--max_seq_length", type=int, default=128, help="tokens per pair (default 128, as training)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--piece_size", type=int, default=PIECE_SIZE, help=f"pairs per piece of OUTPUT.parts/ (default "
                        f"{PIECE_SIZE}): a rerun keeps the complete pieces")
    parser.add_argument("--restart", action="store_true", help="discard the pieces in OUTPUT.parts/ and start over")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="processes that tokenise ahead of the "
                        "model (default 0: the main process; 1-2 on a GPU machine)")
    for key, what in (("sentence1", "first sentence"), ("sentence2", "second sentence"), ("id", "example id")):
        parser.add_argument(f"--{key}_key", default=key, help=f"JSON key of the {what} (default {key})")
    args = parser.parse_args(argv)
    if not args.pair:
        # `--model M S1 S2`: argparse hands the sentences to --model (which takes several folders). They are its
        # last two values that are not folders.
        while len(args.model) > 1 and len(args.pair) < 2 and not os.path.isdir(args.model[-1]):
            args.pair.insert(0, args.model.pop())
    if args.input is None and len(args.pair) != 2:
        raise UserError("give two sentences, or --input FILE --output FILE (see --help)")
    if args.input is not None and args.pair:
        raise UserError("give either two sentences or --input, not both")
    if (args.input is None) != (args.output is None):
        raise UserError("--input and --output go together")
    if args.batch_size < 1 or args.max_seq_length < 8 or args.piece_size < 1 or args.dataloader_num_workers < 0:
        raise UserError("--batch_size and --piece_size must be > 0, --max_seq_length at least 8, "
                        "--dataloader_num_workers >= 0")
    if args.input is not None:
        check_files(args.input, args.output)
    args.models = members(args.model)
    cfg = RunConfig(sentence1_key=args.sentence1_key, sentence2_key=args.sentence2_key, id_key=args.id_key,
                    eval_batch_size=args.batch_size, max_seq_length=args.max_seq_length, cpu=args.cpu,
                    dataloader_num_workers=args.dataloader_num_workers)
    return args, cfg


def check_files(input_path: str, output_path: str) -> None:
    """Before the model is loaded: the input can be read and the output written (without replacing the input).
    OUTPUT's folder may not exist yet: its nearest existing parent must then be a writable folder."""
    if not os.path.isfile(input_path) or not os.access(input_path, os.R_OK):
        raise UserError(f"--input {input_path}: no such readable file")
    if output_path == STDOUT:
        if sys.stdout is None or not _writable(sys.stdout):
            raise UserError("--output -: standard output is closed; give a file, or run without closing it (>&-)")
        return
    if os.path.isdir(output_path):
        raise UserError(f"--output {output_path} is a folder: give a file name (or - for stdout)")
    folder = Path(os.path.abspath(output_path)).parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"--output {output_path}: cannot write this file ({existing} is not a writable folder)")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise UserError(f"--output {output_path} is the --input file")


def _writable(stream) -> bool:
    try:
        os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return True


def check_sentences(pair: list[str]) -> None:
    """The two sentences of the command line are non-empty text. A terminal in another encoding than UTF-8 (GBK,
    say) passes bytes that Python keeps as lone surrogates (U+DC80 + byte), which no tokenizer takes."""
    for which, sentence in zip(("first", "second"), pair):
        at = unencodable(sentence)
        if at is not None:
            code = ord(sentence[at])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"{sentence[at]!a}"
            raise UserError(f"the {which} sentence is not UTF-8 text ({what} at character {at + 1}): is the "
                            "terminal set to another encoding, such as GBK? Set it to UTF-8, or use --input FILE")
        if not sentence.strip():
            raise UserError("the two sentences must not be empty")


def make_output_folder(output: str) -> list[Path]:
    """Create OUTPUT's folder and its missing parents (once the input and the model have been checked); return
    those created, deepest first (removed again if the prediction fails before any piece is done)."""
    folder = Path(os.path.abspath(output)).parent
    try:
        return make_missing_dirs(folder)
    except OSError as e:
        raise UserError(f"--output: cannot create {folder} ({e.strerror or e})") from None


def pair_file(args, folder: str) -> str:
    """The command line's pair as a one-line input file (it then takes the path of any file)."""
    check_sentences(args.pair)
    path = os.path.join(folder, "pair.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({args.sentence1_key: args.pair[0], args.sentence2_key: args.pair[1]},
                           ensure_ascii=False) + "\n")
    return path


def run(argv: list[str] | None = None, stop_requests=None) -> None:
    """Predict the pair or the file; call on every rank (every round of pieces is a collective)."""
    args, cfg = parse_args(argv)
    to_file = args.output not in (None, STDOUT)
    log_errors_to(os.path.dirname(os.path.abspath(args.output)) if to_file else os.getcwd())
    if args.input is not None:
        predict_file(args, cfg, args.input, to_file, stop_requests)
        return
    with tempfile.TemporaryDirectory(prefix="afqmc-pair-") as scratch:
        predict_file(args, cfg, pair_file(args, scratch), to_file, stop_requests)


def predict_file(args, cfg: RunConfig, source: str, to_file: bool, stop_requests) -> None:
    # The flags and files are checked: now the seconds of torch, transformers and accelerate.
    from .distributed import on_main
    from .engine import make_accelerator, release_models
    from .ensemble import shared_labels
    from .evaluation import prepare_for_inference
    from .export.runtime import is_exported, load_exported
    from .inference.engine import PieceRunner
    from .inference.jobs import predict_to_file, predict_to_stdout
    from .inference.scan import scan
    from .model import check_model_fits, load_trained_model

    accelerator, _ = make_accelerator(cfg)
    schema = PairSchema.from_config(cfg)
    index = on_main(accelerator, lambda: scan(source, schema, require_label=False, piece_size=args.piece_size))
    models, tokenizers = [], []
    for folder in args.models:
        # An export (python -m afqmc_dist.export) runs on ONNX Runtime, behind the trained model's interface.
        model, tokenizer = load_exported(folder, prefer_cuda=accelerator.device.type == "cuda") \
            if is_exported(folder) else load_trained_model(folder)
        check_model_fits(model, tokenizer, cfg.max_seq_length, folder)
        models.append(prepare_for_inference(accelerator, model))
        tokenizers.append(tokenizer)
    runner = PieceRunner.of(models, tokenizers, accelerator, index, schema, False, cfg, args.batch_size,
                            shared_labels(models, args.models))
    if args.input is None:
        for results in runner.rounds([0]):
            record = json.loads(results[0].lines[0])
            accelerator.print(f"{record['pred_label']}\t{record['pred_prob']:.6f}")
    elif not to_file:
        done = predict_to_stdout(runner)
        if accelerator.is_main_process:
            print(f"{done.line()} written to stdout", file=sys.stderr)
    else:
        created = on_main(accelerator, lambda: make_output_folder(args.output))
        try:
            written, done = predict_to_file(runner, args.output, args.models, args.restart, None, stop_requests)
        except BaseException:
            if accelerator.is_main_process:
                remove_empty_dirs(created)
            raise
        accelerator.print(f"{done.line()} written to {', '.join(written)}")
    accelerator.wait_for_everyone()
    models = model = runner = None
    release_models(accelerator)
    accelerator.end_training()  # ends the process group


def main(argv: list[str] | None = None) -> int:
    """Run; return the exit status: 2 for a user error, printed as one `error:` line (see errors.exit_status). A
    stop signal ends it at once with status 3 (nothing is half-written: the output is renamed into place)."""
    return run_command(lambda stop_requests: run(argv, stop_requests))


if __name__ == "__main__":
    sys.exit(main())
