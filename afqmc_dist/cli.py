"""Entry point: parse and validate the config, set up accelerate, then train / test / predict.

    python train.py --model_checkpoint bert-base-chinese --train_file train.json --dev_file dev.json \
        --test_file test.json --output_dir outputs/afqmc --do_train --do_predict
    accelerate launch --config_file accelerate_config.yaml train.py ...     # any number of processes

Phases, each optional, in this order: setup (config, accelerator, every input file validated) -> train ->
test (OUTPUT_DIR/best on --test_file) -> predict (OUTPUT_DIR/best on --predict_file) -> cleanup (trackers).
"""

from __future__ import annotations

import os
import sys

from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed

from .config import RunConfig, parse_config
from .data import PairSchema, load_datasets, make_eval_dataloader
from .errors import UserError
from .evaluation import classification_metrics, predict
from .model import build_model_and_tokenizer, check_model_fits, load_trained_config, load_trained_model
from .outputs import TEST_RESULTS, find_best_dir, prepare_output_dir, write_json, write_predictions
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


def check_trained_model(cfg) -> None:
    """Before test/predict without training: OUTPUT_DIR/best exists and was trained with --label_list."""
    best_dir = find_best_dir(cfg.output_dir)
    id2label = load_trained_config(best_dir).id2label
    trained_labels = [id2label[i] for i in sorted(id2label)]
    if trained_labels != list(cfg.label_list):
        raise UserError(f"{best_dir} was trained with labels {trained_labels}, but --label_list is {cfg.label_list}")


def load_best_model(cfg, accelerator):
    """OUTPUT_DIR/best, prepared for inference, and its tokenizer. Call on every rank."""
    best_dir = find_best_dir(cfg.output_dir)
    model, tokenizer = load_trained_model(best_dir)
    check_model_fits(model, tokenizer, cfg.max_seq_length, best_dir)
    return accelerator.prepare(model), tokenizer


def run_test(cfg, accelerator, model, tokenizer, dataset, positive_id: int, tracker) -> dict:
    """Evaluate the best model on the labelled --test_file; write test_results.json."""
    preds = predict(model, accelerator.prepare(make_eval_dataloader(dataset, cfg, tokenizer)), accelerator)
    metrics = {**classification_metrics(preds.pred_ids, preds.labels, positive_id), "loss": preds.loss}
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, TEST_RESULTS), {f"test_{k}": v for k, v in metrics.items()})
    tracker.log(metrics, prefix="test", summary=True)
    accelerator.print(f"test: accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f} ({metrics['count']} pairs)")
    return metrics


def run_predict(cfg, accelerator, model, tokenizer, dataset) -> None:
    """Predict every line of --predict_file (default --test_file) with the best model, in input order."""
    preds = predict(model, accelerator.prepare(make_eval_dataloader(dataset, cfg, tokenizer)), accelerator)
    if accelerator.is_main_process:
        for path in write_predictions(cfg.output_dir, dataset.examples, preds, cfg.label_list, cfg.id_key):
            accelerator.print(f"predict: {len(preds)} lines -> {path}")
    accelerator.wait_for_everyone()


def run(cfg: RunConfig) -> None:
    # --- setup: everything that can be wrong with the inputs is found before anything is written ---
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    accelerator.print(f"{accelerator.num_processes} process(es), device {accelerator.device.type}, "
                      f"precision {accelerator.mixed_precision}, distributed {accelerator.distributed_type}")
    schema = PairSchema.from_config(cfg)
    positive_id = schema.label2id[cfg.positive_label]
    datasets = load_datasets(cfg, schema)
    if not cfg.do_train:
        check_trained_model(cfg)
    run_info = {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                "global_batch_size": cfg.global_batch_size(accelerator.num_processes)}
    if cfg.do_train:
        # The main process downloads a hub checkpoint first; the others then read it from the cache.
        with accelerator.main_process_first():
            model, tokenizer = build_model_and_tokenizer(cfg)
        run_info["num_parameters"] = model.num_parameters()
    if accelerator.is_main_process:
        prepare_output_dir(cfg.output_dir, fresh=cfg.do_train)
    accelerator.wait_for_everyone()
    tracker = Tracker(accelerator, cfg, run_info)

    # --- train ---
    if cfg.do_train:
        best = train(cfg, accelerator, model, tokenizer, datasets["train"], datasets["dev"], positive_id, tracker)
        tracker.summarize({k if k.startswith("best_") else f"best_{k}": v for k, v in best.items()})
        accelerator.print(f"best: epoch {best['best_epoch']} step {best['best_step']} dev accuracy "
                          f"{best['dev_accuracy']:.4f} f1 {best['dev_f1']:.4f} -> {cfg.best_model_dir}")
        # Drop the training model and optimizer state before the best model is loaded.
        model = None
        accelerator.free_memory()

    # --- test and predict, with the best model loaded once ---
    if cfg.do_test or cfg.do_predict:
        model, tokenizer = load_best_model(cfg, accelerator)
        if cfg.do_test:
            run_test(cfg, accelerator, model, tokenizer, datasets["test"], positive_id, tracker)
        if cfg.do_predict:
            run_predict(cfg, accelerator, model, tokenizer, datasets["predict"])

    # --- cleanup ---
    tracker.finish()


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (2 for a user error, printed as one `error:` line).

    Under several processes every rank that fails prints its line, prefixed with its rank, so an error seen by
    one rank only (a node-local path, say) is never silent.
    """
    try:
        run(parse_config(argv))
    except UserError as e:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world_size > 1 else ""
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2
    return 0
