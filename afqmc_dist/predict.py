r"""Predict with a trained model: one pair from the command line, or a whole JSON-lines file.

    python -m afqmc_dist.predict --model OUTPUT_DIR/best "花呗如何还款" "花呗怎么还钱"
    python -m afqmc_dist.predict --model OUTPUT_DIR/best --input pairs.json --output preds.jsonl
    python -m afqmc_dist.predict --model OUTPUT_DIR/best --input pairs.json --output - | jq .pred_label
    accelerate launch --config_file accelerate_config.yaml --multi_gpu --num_processes 4 \
        -m afqmc_dist.predict --model OUTPUT_DIR/best --input pairs.json --output preds.jsonl   # a large file

A pair prints one line on stdout, `LABEL<TAB>PROB`: the predicted label (from the model's id2label) and its
probability with 6 decimals, e.g. `1<TAB>0.973112`. A file is read and checked as the tool's data files are (labels
are not needed) and gives what `--do_predict` gives: OUTPUT holds every input line, in input order, with
`pred_label` and `pred_prob` added; when every line has an id, CLUE's `afqmc_predict.json` is written beside it.
OUTPUT's folder is created if needed (once the inputs and the model have been checked); both files appear whole
or not at all. `--output -` writes the same lines to stdout instead (no CLUE file), for pipelines: messages and
progress go to stderr.

Errors are one `error: ...` line on stderr, exit status 2, and nothing is written: a folder that is not a model
trained by the tool (a base checkpoint has no trained classifier), a bad input line (see pairs.py: ids must be
unique), a sentence on the command line that is not UTF-8 text. An unexpected error is one line too, exit status
4, with its traceback in error.log beside OUTPUT (in the current folder for a pair or `--output -`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import DEFAULT_EVAL_BATCH, RunConfig
from .errors import CommandParser, UserError, log_errors_to
from .outputs import PREDICTIONS
from .pairs import PairExample, PairSchema, read_pairs, unencodable
from .predictions import prediction_record, write_predictions
from .preemption import run_command

STDOUT = "-"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """The flags, checked, and the RunConfig that the tool's data, loader and accelerator code expect."""
    parser = CommandParser(prog="python -m afqmc_dist.predict", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair", nargs="*", metavar="SENTENCE", help="the two sentences of one pair")
    parser.add_argument("--model", required=True, help="a folder written by the tool (OUTPUT_DIR/best)")
    parser.add_argument("--input", help="JSON-lines file of pairs, instead of two sentences")
    parser.add_argument("--output", help="the JSON-lines file the predictions of --input go to (its folder is "
                        "created if needed), or - for stdout")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_EVAL_BATCH, help="pairs per batch and process "
                        f"(default {DEFAULT_EVAL_BATCH}; batches go by length, so big ones waste little)")
    parser.add_argument("--max_seq_length", type=int, default=128, help="tokens per pair (default 128, as training)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    for key, what in (("sentence1", "first sentence"), ("sentence2", "second sentence"), ("id", "example id")):
        parser.add_argument(f"--{key}_key", default=key, help=f"JSON key of the {what} (default {key})")
    args = parser.parse_args(argv)
    if args.input is None and len(args.pair) != 2:
        raise UserError("give two sentences, or --input FILE --output FILE (see --help)")
    if args.input is not None and args.pair:
        raise UserError("give either two sentences or --input, not both")
    if (args.input is None) != (args.output is None):
        raise UserError("--input and --output go together")
    if args.batch_size < 1 or args.max_seq_length < 8:
        raise UserError("--batch_size must be > 0 and --max_seq_length at least 8")
    if args.input is not None:
        check_files(args.input, args.output)
    cfg = RunConfig(sentence1_key=args.sentence1_key, sentence2_key=args.sentence2_key, id_key=args.id_key,
                    eval_batch_size=args.batch_size, max_seq_length=args.max_seq_length, cpu=args.cpu)
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


def make_dirs(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, deepest first (to undo on failure)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir()
    return missing


def write_output(output_path: str, examples, preds, label_list: list[str], id_key: str) -> list[str]:
    """`write_predictions` into a scratch folder beside OUTPUT, each file then renamed into place (atomic: same
    filesystem): predictions.jsonl to OUTPUT, afqmc_predict.json beside it. Creates OUTPUT's folder if needed, and
    removes the folders it created if nothing could be put in place. Main process only."""
    folder = Path(os.path.abspath(output_path)).parent
    created, scratch, written = [], None, []
    try:
        created = make_dirs(folder)
        scratch = tempfile.mkdtemp(prefix=".predict-", dir=folder)
        for path in write_predictions(scratch, examples, preds, label_list, id_key):
            name = os.path.basename(path)
            target = output_path if name == PREDICTIONS else os.path.join(os.path.dirname(output_path), name)
            os.replace(path, target)
            written.append(target)
    except OSError as e:
        raise UserError(f"--output {output_path}: cannot write it ({e.strerror or e})") from None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        for path in created if not written else []:  # deepest first, each empty by now
            try:
                path.rmdir()
            except OSError:
                break
    return written


def write_stdout(examples, preds, label_list: list[str]) -> None:
    """One JSON line per pair on stdout, in input order, as OUTPUT would hold them (UTF-8). A reader that stops
    early (`| head`) ends the output quietly. Main process only."""
    pred_ids, pred_probs = preds.pred_ids.tolist(), preds.probs.max(dim=-1).values.tolist()
    try:
        for example, pred, prob in zip(examples, pred_ids, pred_probs, strict=True):
            record = prediction_record(example, pred, prob, label_list)
            sys.stdout.buffer.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader is gone: point stdout at /dev/null so that Python's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run(argv: list[str] | None = None) -> None:
    """Predict the pair or the file; call on every rank (`predict` gathers across processes)."""
    args, cfg = parse_args(argv)
    # The flags and files are checked: now the seconds of torch, transformers and accelerate.
    from .data import PairDataset, make_eval_dataloader
    from .engine import make_accelerator, release_models
    from .evaluation import predict, prepare_for_inference
    from .model import check_model_fits, load_trained_model

    to_file = args.output not in (None, STDOUT)
    log_errors_to(os.path.dirname(os.path.abspath(args.output)) if to_file else os.getcwd())
    if args.input is None:  # the pair goes through the same path as a one-line file, checked as a line is
        check_sentences(args.pair)
        s1, s2 = args.pair
        examples = [PairExample(s1, s2, None, {cfg.sentence1_key: s1, cfg.sentence2_key: s2})]
    else:
        examples = read_pairs(args.input, PairSchema.from_config(cfg), require_label=False)
    accelerator, _ = make_accelerator(cfg)
    model, tokenizer = load_trained_model(args.model)
    check_model_fits(model, tokenizer, cfg.max_seq_length, args.model)
    id2label = model.config.id2label
    label_list = [id2label[i] for i in sorted(id2label)]
    dataset = PairDataset(examples)
    dataset.encode(tokenizer, cfg.max_seq_length)  # no cache: a one-off input would only fill the disk
    plan = cfg.batch_plan(accelerator.num_processes)
    # The whole model on each process, the data sharded: works under every engine (see prepare_for_inference).
    model = prepare_for_inference(accelerator, model)
    loader = accelerator.prepare_data_loader(make_eval_dataloader(dataset, cfg, plan, tokenizer, accelerator))
    preds = predict(model, loader, accelerator, desc="predict")
    if args.input is None:
        accelerator.print(f"{label_list[preds.pred_ids[0].item()]}\t{preds.probs[0].max().item():.6f}")
    elif accelerator.is_main_process and not to_file:
        write_stdout(examples, preds, label_list)
        print(f"{len(preds)} predictions ({preds.samples_per_second:.0f} pairs/s) written to stdout", file=sys.stderr)
    elif accelerator.is_main_process:
        written = write_output(args.output, examples, preds, label_list, cfg.id_key)
        print(f"{len(preds)} predictions ({preds.samples_per_second:.0f} pairs/s) written to {', '.join(written)}")
    accelerator.wait_for_everyone()
    model = None
    release_models(accelerator)
    accelerator.end_training()  # ends the process group


def main(argv: list[str] | None = None) -> int:
    """Run; return the exit status: 2 for a user error, printed as one `error:` line (see errors.exit_status). A
    stop signal ends it at once with status 3 (nothing is half-written: the output is renamed into place)."""
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
