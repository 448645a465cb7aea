"""What a run leaves in OUTPUT_DIR, by name. Each file is written by the main process only, through files.py
(never half-written); run_folder.py owns the folder itself (its lock, a replaced run set aside, resuming).

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
    tensorboard/, mlflow.db, mlruns/, wandb/   the trackers' own files, with --report_to (tracking.py)
    .previous-run/        while a run started with --overwrite_output_dir has not saved its first best model:
                          the outputs of the run it replaces (run_folder.py)
    .afqmc.lock, .afqmc.lock.json   the folder's lock and who holds it (run_folder.py)
"""

from __future__ import annotations

import os

BEST_DIR, CHECKPOINTS = "best", "checkpoints"
RESULTS, METRICS, TEST_RESULTS = "results.json", "metrics.jsonl", "test_results.json"
PREDICTIONS = "predictions.jsonl"
RUN_CONFIG = "run_config.json"
PHASE_CONFIGS = {"train": RUN_CONFIG, "test": "test_config.json", "predict": "predict_config.json"}
TENSORBOARD_DIR, MLFLOW_DB, MLFLOW_ARTIFACTS = "tensorboard", "mlflow.db", "mlruns"
# What a training run owns in OUTPUT_DIR: set aside by --overwrite_output_dir (other files are left alone).
RUN_FILES = (RESULTS, METRICS, TEST_RESULTS, PREDICTIONS, *PHASE_CONFIGS.values(), "error.log", MLFLOW_DB)
RUN_DIRS = (BEST_DIR, CHECKPOINTS, TENSORBOARD_DIR, MLFLOW_ARTIFACTS)


def clue_file_name(task_name: str) -> str:
    """CLUE's submission file for a task: afqmc_predict.json, ocnli_50k_predict.json, ..."""
    return f"{task_name}_predict.json"


def is_clue_file(name: str) -> bool:
    return name.endswith("_predict.json")


def run_outputs(output_dir: str) -> list[str]:
    """The names in OUTPUT_DIR that belong to a training run of this tool (CLUE files included)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in RUN_FILES or name in RUN_DIRS or name == f"{BEST_DIR}.old" or is_clue_file(name))
