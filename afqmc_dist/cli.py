"""Entry point: parse and validate the config, set up accelerate, then train / test / predict.

    python train.py --model_checkpoint bert-base-chinese --train_file train.json --dev_file dev.json \
        --test_file test.json --output_dir outputs/afqmc --do_train --do_predict
    accelerate launch --config_file accelerate_config.yaml train.py ...     # any number of processes

Phases (each optional, in this order): train -> test (OUTPUT_DIR/best on --test_file) -> predict.
"""

from __future__ import annotations

import os
import sys

from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed

from .config import RunConfig, parse_config
from .data import PairSchema, load_datasets, make_eval_dataloader
from .errors import UserError
from .evaluation import Predictions, classification_metrics, predict
from .model import build_model_and_tokenizer, count_parameters, load_trained_model
from .outputs import find_best_dir, write_json, write_predictions
from .tracking import Tracker
from .training import train


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The Accelerator for this run; precision comes from --mixed_precision, else the launcher/config."""
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with="wandb" if cfg.report_to == "wandb" else None,
            # Seedable sampler: the shuffle of epoch e depends only on (seed, e), on every rank.
            # No dispatching: with --streaming every process reads the file and keeps its share of each batch.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                      dispatch_batches=False),
        )
    except ValueError as e:  # e.g. bf16 asked of a device without it
        raise UserError(f"accelerate cannot set up this run: {e}") from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("fp16 mixed precision was requested but this run is on the CPU, where fp16 does "
                        "nothing; use --mixed_precision bf16 (or no)")
    return accelerator


def predict_with_best(cfg, accelerator, dataset) -> Predictions:
    """Load OUTPUT_DIR/best and predict `dataset` with it on every rank (gathered, in dataset order)."""
    best_dir = find_best_dir(cfg.output_dir)
    model, tokenizer = load_trained_model(best_dir)
    trained_labels = list(model.config.id2label.values())
    if trained_labels != list(cfg.label_list):
        raise UserError(f"{best_dir} was trained with labels {trained_labels}, but --label_list is {cfg.label_list}")
    model, loader = accelerator.prepare(model, make_eval_dataloader(dataset, cfg, tokenizer))
    return predict(model, loader, accelerator)


def run_test(cfg, accelerator, dataset, tracker) -> dict:
    """Evaluate OUTPUT_DIR/best on the labelled --test_file; write test_results.json."""
    preds = predict_with_best(cfg, accelerator, dataset)
    positive_id = PairSchema.from_config(cfg).label2id[cfg.positive_label]
    metrics = classification_metrics(preds.pred_ids, preds.labels, positive_id)
    results = {f"test_{k}": v for k, v in {**metrics, "loss": preds.loss}.items()}
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, "test_results.json"), results)
    tracker.log(results, step=0, prefix="test")
    accelerator.print(f"test: accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f} ({metrics['count']} pairs)")
    return results


def run_predict(cfg, accelerator, dataset) -> None:
    """Predict every line of --predict_file (default --test_file) with OUTPUT_DIR/best, in input order."""
    preds = predict_with_best(cfg, accelerator, dataset)
    if accelerator.is_main_process:
        for path in write_predictions(cfg.output_dir, dataset.examples, preds, cfg.label_list, cfg.id_key):
            accelerator.print(f"predict: {len(preds)} lines -> {path}")
    accelerator.wait_for_everyone()


def run(cfg: RunConfig) -> None:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.print(f"{accelerator.num_processes} process(es), device {accelerator.device.type}, "
                      f"precision {accelerator.mixed_precision}, distributed {accelerator.distributed_type}")

    datasets = load_datasets(cfg, PairSchema.from_config(cfg))  # every input validated before any real work
    model = tokenizer = None
    run_info = {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                "global_batch_size": cfg.global_batch_size(accelerator.num_processes)}
    if cfg.do_train:
        model, tokenizer = build_model_and_tokenizer(cfg)
        run_info["num_parameters"] = count_parameters(model)
    tracker = Tracker(accelerator, cfg, run_info)
    if cfg.do_train:
        best = train(cfg, accelerator, model, tokenizer, datasets["train"], datasets["dev"], tracker)
        # Drop the training model and optimizer state before test/predict load the best model.
        model = None
        accelerator.free_memory()
        tracker.summarize({f"best_{k}" if not k.startswith("best_") else k: v for k, v in best.items()})
        accelerator.print(f"best: epoch {best['best_epoch']} step {best['best_step']} dev accuracy "
                          f"{best['dev_accuracy']:.4f} f1 {best['dev_f1']:.4f} -> {cfg.best_model_dir}")
    if cfg.do_test:
        run_test(cfg, accelerator, datasets["test"], tracker)
    if cfg.do_predict:
        run_predict(cfg, accelerator, datasets["predict"])
    tracker.finish()


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (2 for a user error, printed as one line by rank 0)."""
    try:
        run(parse_config(argv))
    except UserError as e:
        if _is_rank_zero():
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
