"""Files a run leaves in OUTPUT_DIR, each written by the main process only and never left half-written.

    best/                 Hugging Face folder of the best model so far (config, model.safetensors, tokenizer)
    results.json          best epoch, step and dev metrics (+ training throughput once training ends)
    metrics.jsonl         every logged record: training loss/lr/throughput, evaluations (see tracking.py)
    run_config.json       the run's full configuration and derived values (processes, global batch, ...)
    checkpoints/step_N/   full training state, with --checkpointing_steps or on a stop signal (checkpoints.py)
    test_results.json     --do_test
    predictions.jsonl     --do_predict: input fields + pred_label + pred_prob, in input order
    afqmc_predict.json    --do_predict on inputs with ids: CLUE's submission format
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

BEST_DIR = "best"
RESULTS, METRICS, TEST_RESULTS = "results.json", "metrics.jsonl", "test_results.json"
PREDICTIONS, CLUE_PREDICTIONS = "predictions.jsonl", "afqmc_predict.json"
RUN_CONFIG = "run_config.json"
RUN_FILES = (RESULTS, METRICS, TEST_RESULTS, PREDICTIONS, CLUE_PREDICTIONS, RUN_CONFIG)
RUN_DIRS = (BEST_DIR, f"{BEST_DIR}.old", f"{BEST_DIR}.tmp", "checkpoints")


@contextmanager
def atomic_open(path: str):
    """Open `path` for writing through `path.tmp`, renamed over `path` only if the block completes."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
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


def prepare_output_dir(output_dir: str, fresh: bool) -> None:
    """Create OUTPUT_DIR. With `fresh` (a new training run), first remove what an earlier run of this tool left
    there (best/, checkpoints/, results, metrics, predictions), so no stale file sits beside the new model (and no
    old checkpoint is taken for `latest`). Main process only."""
    os.makedirs(output_dir, exist_ok=True)
    if fresh:
        for name in RUN_FILES:
            path = os.path.join(output_dir, name)
            if os.path.exists(path):
                os.remove(path)
        for name in RUN_DIRS:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


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


def save_best_model(accelerator, model, tokenizer, output_dir: str) -> str:
    """Write the prepared `model` and `tokenizer` to OUTPUT_DIR/best. Call on EVERY rank.

    The state dict is taken through `accelerator.get_state_dict`, a collective that gathers a model sharded by
    FSDP/DeepSpeed, so the saved folder is whole and loads into a plain single-process model. Only the main
    process writes, into `best.tmp`, renamed over `best` once complete.
    """
    final = os.path.join(output_dir, BEST_DIR)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = f"{final}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def write_predictions(output_dir: str, examples, preds, label_list, id_key: str) -> list[str]:
    """Write predictions.jsonl (and afqmc_predict.json when every input has `id_key`). Main process only.

    `examples[i]` and row i of `preds` describe input line i; returns the paths written.
    """
    pred_ids = preds.pred_ids.tolist()
    pred_probs = preds.probs.max(dim=-1).values.tolist()
    path = os.path.join(output_dir, PREDICTIONS)
    write_jsonl(path, ({**e.raw, "pred_label": label_list[p], "pred_prob": round(prob, 6)}
                       for e, p, prob in zip(examples, pred_ids, pred_probs, strict=True)))
    written = [path]
    if all(id_key in e.raw for e in examples):
        clue = os.path.join(output_dir, CLUE_PREDICTIONS)
        write_jsonl(clue, ({"id": e.raw[id_key], "label": label_list[p]} for e, p in zip(examples, pred_ids)))
        written.append(clue)
    return written
