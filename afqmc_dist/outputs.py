"""Files a run leaves in OUTPUT_DIR, each written by the main process only and never left half-written.

    best/                 Hugging Face folder of the best model so far (config, model.safetensors, tokenizer), fp32
    results.json          best epoch, step and dev metrics (+ training throughput once training ends)
    metrics.jsonl         every logged record: training loss/lr/throughput, evaluations (see tracking.py)
    run_config.json       the training run's full configuration and derived values (processes, global batch, ...)
    test_config.json      the same for a later --do_test run on this folder (the training record stays)
    predict_config.json   the same for a later --do_predict run
    checkpoints/step_N/   full training state, with --checkpointing_steps or on a stop signal (checkpoints.py)
    test_results.json     --do_test
    predictions.jsonl     --do_predict: input fields + pred_label + pred_prob, in input order
    TASK_predict.json     --do_predict on inputs with ids: CLUE's submission format (afqmc_predict.json)
    error.log             the traceback of an unexpected error (errors.py)
    .previous-run/        while a run started with --overwrite_output_dir has not saved its first best model:
                          the outputs it replaces, put back if it fails before then

Every write goes to a temporary name that is renamed into place when complete and removed on any error (a full
disk included); leftovers of a crash (`*.tmp`) are removed when the next run starts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager

import torch
from safetensors import SafetensorError

from .errors import UserError
from .loading import quiet_transformers

# What a failed write of weights raises: OSError, torch's RuntimeError ("unexpected pos ..." on a full disk),
# safetensors' own error ("No space left on device").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)

BEST_DIR = "best"
RESULTS, METRICS, TEST_RESULTS = "results.json", "metrics.jsonl", "test_results.json"
PREDICTIONS = "predictions.jsonl"
RUN_CONFIG = "run_config.json"
PHASE_CONFIGS = {"train": RUN_CONFIG, "test": "test_config.json", "predict": "predict_config.json"}
PREVIOUS_RUN = ".previous-run"
# What a training run owns in OUTPUT_DIR: set aside by --overwrite_output_dir (other files are left alone).
RUN_FILES = (RESULTS, METRICS, TEST_RESULTS, PREDICTIONS, *PHASE_CONFIGS.values(), "error.log", "mlflow.db")
RUN_DIRS = (BEST_DIR, "checkpoints", "tensorboard", "mlruns")


def clue_file_name(task_name: str) -> str:
    """CLUE's submission file for a task: afqmc_predict.json, ocnli_50k_predict.json, ..."""
    return f"{task_name}_predict.json"


def is_clue_file(name: str) -> bool:
    return name.endswith("_predict.json")


def free_mib(path: str) -> float:
    """Free space on the disk holding `path` (or its nearest existing parent), in MiB."""
    existing = os.path.abspath(path)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free / 2**20


def write_error(path: str, error: BaseException) -> str:
    """One line for a failed write: what failed, and the free space when the disk is the likely cause."""
    text = str(error).strip()
    reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
    # torch's zip writer reports a full disk as "unexpected pos", safetensors as "No space left on device".
    full = getattr(error, "errno", None) == errno.ENOSPC or "space" in text.lower() or "unexpected pos" in text
    free = f" ({free_mib(path):.0f} MiB free on its disk)" if full or free_mib(path) < 64 else ""
    return f"writing {path} failed: {reason}{free}"


def remove_quietly(path: str) -> None:
    """Remove a file or folder the tool wrote (a temporary), ignoring one that is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@contextmanager
def atomic_open(path: str):
    """Open `path` for writing through `path.tmp`, renamed over `path` only if the block completes. On any error
    (a full disk, Ctrl-C) the temporary is removed and `path` is left as it was; OSError becomes a UserError."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(write_error(path, e)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)


def write_jsonl(path: str, records) -> None:
    """One JSON document per line, streamed (predictions of a large file are never one big string)."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


# --- the output folder of a run -------------------------------------------------------------------------------

def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Remove what a crashed save left behind (`best.tmp/`, `checkpoints/step_N.tmp/`, `*.tmp` files). Call while
    holding the folder's lock (runlock.py): no other run can be writing them. Returns the paths removed."""
    folders = [output_dir, os.path.join(output_dir, "checkpoints")]
    stale = [os.path.join(folder, name) for folder in folders if os.path.isdir(folder)
             for name in sorted(os.listdir(folder)) if name.endswith((".tmp", ".old")) and name != f"{BEST_DIR}.old"]
    for path in stale:
        remove_quietly(path)
    return stale


def run_outputs(output_dir: str) -> list[str]:
    """The names in OUTPUT_DIR that belong to a training run of this tool (CLUE files included)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in RUN_FILES or name in RUN_DIRS or name == f"{BEST_DIR}.old" or is_clue_file(name))


def set_aside_previous_run(output_dir: str) -> list[str]:
    """Before a fresh training run in a folder that holds another run: move that run's outputs into
    OUTPUT_DIR/.previous-run/ (renames, nothing copied or deleted). They stay there until the new run saves its
    first best model (`discard_previous_run`), and come back if it fails before (`restore_previous_run`).

    If .previous-run/ already exists, an earlier overwrite never got that far: it still holds the last run that
    did, and what sits in OUTPUT_DIR now is the unfinished run's (no best model), which is removed. Main only.
    Returns the names set aside or removed.
    """
    names = run_outputs(output_dir)
    aside = os.path.join(output_dir, PREVIOUS_RUN)
    if os.path.isdir(aside):
        for name in names:
            remove_quietly(os.path.join(output_dir, name))
        return names
    if names:
        os.makedirs(aside)
        for name in names:
            os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    return names


def restore_previous_run(output_dir: str) -> bool:
    """Put the outputs set aside back (the failed new run's own outputs are removed first). Main only."""
    aside = os.path.join(output_dir, PREVIOUS_RUN)
    if not os.path.isdir(aside):
        return False
    for name in run_outputs(output_dir):
        remove_quietly(os.path.join(output_dir, name))
    for name in os.listdir(aside):
        os.replace(os.path.join(aside, name), os.path.join(output_dir, name))
    os.rmdir(aside)
    return True


def discard_previous_run(output_dir: str) -> None:
    """The new run has a best model of its own: the outputs set aside are no longer needed. Main only."""
    remove_quietly(os.path.join(output_dir, PREVIOUS_RUN))


def replace_dir(tmp: str, final: str) -> None:
    """Put the finished folder `tmp` at `final`, keeping the old `final` until the new one is in place.

    A crash at any point leaves either the old or the new folder complete at `final`, or (between the two
    renames) the old one complete at `final.old`, which `find_best_dir` falls back to.
    """
    old = f"{final}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_best_dir(output_dir: str) -> str:
    """The best-model folder of `output_dir` (or its previous version if a crash hit mid-replace)."""
    best = os.path.join(output_dir, BEST_DIR)
    return best if os.path.isdir(best) or not os.path.isdir(f"{best}.old") else f"{best}.old"


# --- the best model ------------------------------------------------------------------------------------------

def save_best_model(accelerator, model, tokenizer, output_dir: str) -> str:
    """Write the prepared `model` and `tokenizer` to OUTPUT_DIR/best. Call on EVERY rank.

    The state dict is taken through `accelerator.get_state_dict`, a collective that gathers a model sharded by
    FSDP/DeepSpeed, so the saved folder is whole and loads into a plain single-process model; floating-point
    weights are saved in fp32 whatever the engine computes in. Only the main process writes, into `best.tmp`,
    renamed over `best` once complete; on a failed write (a full disk) `best.tmp` is removed, `best/` stays as it
    was, and every rank raises the same UserError. Once the new best/ is in place, outputs set aside by
    --overwrite_output_dir are discarded.
    """
    from .distributed import first_error

    final = os.path.join(output_dir, BEST_DIR)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    error = None
    if accelerator.is_main_process:
        state_dict = {k: v.float() if torch.is_floating_point(v) else v for k, v in state_dict.items()}
        tmp = f"{final}.tmp"
        try:
            remove_quietly(tmp)
            with quiet_transformers():
                accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict,
                                                                save_function=accelerator.save)
                tokenizer.save_pretrained(tmp)
            replace_dir(tmp, final)
            discard_previous_run(output_dir)
        except WRITE_ERRORS as e:
            error = write_error(tmp, e)
        finally:
            remove_quietly(tmp)
    error = first_error(accelerator, error)
    if error:
        raise UserError(f"cannot save the best model: {error}; {final} is as it was")
    accelerator.wait_for_everyone()
    return final


# --- predictions ---------------------------------------------------------------------------------------------

def prediction_record(example, pred_id: int, prob: float, label_list) -> dict:
    """One line of predictions.jsonl: the input line's fields, the predicted label and its probability."""
    return {**example.raw, "pred_label": label_list[pred_id], "pred_prob": round(prob, 6)}


def write_predictions(output_dir: str, examples, preds, label_list, id_key: str, task_name: str = "afqmc",
                      predictions_name: str = PREDICTIONS) -> list[str]:
    """Write predictions.jsonl (and TASK_predict.json when every input has `id_key`). Main process only.

    `examples[i]` and row i of `preds` describe input line i; returns the paths written. A CLUE file left in
    the folder by an earlier prediction (of this or another task) is removed once the new files are in place, so
    an old submission never sits beside new predictions.
    """
    pred_ids = preds.pred_ids.tolist()
    pred_probs = preds.probs.max(dim=-1).values.tolist()
    path = os.path.join(output_dir, predictions_name)
    write_jsonl(path, (prediction_record(e, p, prob, label_list)
                       for e, p, prob in zip(examples, pred_ids, pred_probs, strict=True)))
    written = [path]
    clue = None
    if all(id_key in e.raw for e in examples):
        clue = os.path.join(output_dir, clue_file_name(task_name))
        write_jsonl(clue, ({"id": e.raw[id_key], "label": label_list[p]} for e, p in zip(examples, pred_ids)))
        written.append(clue)
    for name in os.listdir(output_dir):
        if is_clue_file(name) and os.path.join(output_dir, name) != clue:
            os.remove(os.path.join(output_dir, name))
    return written
