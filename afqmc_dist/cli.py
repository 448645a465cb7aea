"""Entry point: parse and validate the config, set up accelerate, then train / test / predict.

    python train.py --model_checkpoint bert-base-chinese --train_file train.json --dev_file dev.json \
        --test_file test.json --output_dir outputs/afqmc --do_train --do_predict
    accelerate launch --config_file accelerate_config.yaml train.py ...     # any number of processes

Phases, each optional, in this order: setup (config, accelerator, every input file validated) -> train ->
test (OUTPUT_DIR/best on --test_file) -> predict (OUTPUT_DIR/best on --predict_file) -> cleanup (trackers).
"""

from __future__ import annotations

import os
import time

from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, set_seed

from .checkpoints import (
    check_compatible,
    check_free_space,
    estimate_checkpoint_bytes,
    read_state,
    resolve_resume,
    run_fingerprint,
)
from .config import RunConfig, parse_config
from .data import PairSchema, encode_datasets, load_datasets, make_eval_dataloader
from .errors import UserError, exit_status
from .evaluation import evaluate, predict
from .model import build_model_and_tokenizer, check_model_fits, load_trained_config, load_trained_model
from .outputs import RESULTS, RUN_CONFIG, TEST_RESULTS, find_best_dir, prepare_output_dir, write_json, write_predictions
from .summary import git_commit, run_summary
from .tracking import Tracker
from .training import train


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The Accelerator for this run; precision comes from --mixed_precision, else the launcher/config."""
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=cfg.trackers or None,
            # split_batches: a DataLoader batch holds the pairs of every process (one micro-batch of a global
            # batch) and each process takes its slice, so the global batches are the same on any number of
            # processes (sampling.py). No dispatching: with --streaming every process reads the file and keeps
            # its share of each batch.
            dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False),
        )
    except ValueError as e:  # e.g. bf16 asked of a device without it
        raise UserError(f"accelerate cannot set up this run: {e}") from None
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator) -> None:
    """Refuse a launch that accelerate would silently turn into something else than what was asked."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("fp16 mixed precision was requested but this run is on the CPU, where fp16 does "
                        "nothing; use --mixed_precision bf16 (or no)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. --multi_gpu on a machine without GPUs: each process would train (and write) on its own.
        raise UserError(f"the launcher started {launched} processes but accelerate connected "
                        f"{accelerator.num_processes}; without GPUs, launch with ACCELERATE_USE_CPU=1 "
                        "(see launch/cpu_debug_2proc.sh)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
            and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError("the accelerate config asks for FSDP, but accelerate set up "
                        f"{accelerator.distributed_type.value} (it shards across GPUs only, and falls back "
                        "to DDP on the CPU); on a CPU, use launch/cpu_debug_2proc.sh")


def release_models(accelerator) -> None:
    """Free the prepared models (the caller drops its own references first). Call before the process group is
    destroyed: a DDP wrapper freed after it would destroy the gloo group from its reducer without releasing the
    GIL, and a gloo thread finishing a collective needs the GIL: the process would hang at exit."""
    accelerator.free_memory()


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


def run_test(cfg, plan, accelerator, model, tokenizer, dataset, positive_id: int, tracker) -> dict:
    """Evaluate the best model on the labelled --test_file; write test_results.json."""
    loader = accelerator.prepare(make_eval_dataloader(dataset, cfg, plan, tokenizer, accelerator))
    metrics = evaluate(model, loader, accelerator, positive_id, desc="test")
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, TEST_RESULTS), {f"test_{k}": v for k, v in metrics.items()})
    tracker.log(metrics, prefix="test", summary=True)
    accelerator.print(f"test: accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f} ({metrics['count']} pairs)")
    return metrics


def run_predict(cfg, plan, accelerator, model, tokenizer, dataset, tracker) -> list[str]:
    """Predict every line of --predict_file (default --test_file) with the best model, in input order."""
    loader = accelerator.prepare(make_eval_dataloader(dataset, cfg, plan, tokenizer, accelerator))
    preds = predict(model, loader, accelerator, desc="predict")
    tracker.log({"samples_per_second": preds.samples_per_second, "count": len(preds)}, prefix="predict")
    written = []
    if accelerator.is_main_process:
        written = write_predictions(cfg.output_dir, dataset.examples, preds, cfg.label_list, cfg.id_key)
    accelerator.wait_for_everyone()
    return written


def prepare_resume(cfg, plan, model, accelerator) -> tuple[str | None, str | None]:
    """The checkpoint to resume from (None: start fresh) and its W&B run id, after checking that it belongs to
    this run (same model, data, global batch, ...)."""
    path = resolve_resume(cfg) if cfg.resume_from_checkpoint else None
    if cfg.resume_from_checkpoint == "latest" and path is None:
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {cfg.output_dir} yet, starting afresh")
    if path is None:
        return None, None
    state = read_state(path)
    check_compatible(path, state.fingerprint, run_fingerprint(cfg, model, plan))
    return path, state.wandb_run_id


def run(cfg: RunConfig) -> None:
    started = time.time()
    # --- setup: everything that can be wrong with the inputs is found before anything is written ---
    accelerator = make_accelerator(cfg)
    plan = cfg.batch_plan(accelerator.num_processes)
    set_seed(cfg.seed)
    accelerator.print(f"{accelerator.num_processes} process(es), device {accelerator.device.type}, "
                      f"precision {accelerator.mixed_precision}, distributed {accelerator.distributed_type}")
    if cfg.do_train:
        accelerator.print(f"global batch {plan.global_batch} = {plan.per_device} per process x "
                          f"{plan.num_processes} process(es) x {plan.accumulation} accumulation step(s)")
    schema = PairSchema.from_config(cfg)
    positive_id = schema.label2id[cfg.positive_label]
    datasets = load_datasets(cfg, schema)
    if not cfg.do_train:
        check_trained_model(cfg)
    run_info = {**plan.describe(), "mixed_precision": accelerator.mixed_precision, "git_commit": git_commit()}
    resume_from = wandb_id = None
    if cfg.do_train:
        # The main process downloads a hub checkpoint first; the others then read it from the cache.
        with accelerator.main_process_first():
            model, tokenizer = build_model_and_tokenizer(cfg)
        run_info["num_parameters"] = model.num_parameters()
        needed = estimate_checkpoint_bytes(model.num_parameters())
        check_free_space(cfg.output_dir, needed if cfg.checkpointing_steps else needed // 4)
        resume_from, wandb_id = prepare_resume(cfg, plan, model, accelerator)
        encode_datasets({k: datasets[k] for k in ("train", "dev")}, tokenizer, cfg, accelerator)
        if cfg.torch_compile:
            model.compile()  # in place: parameter names (and so saved checkpoints) stay those of the model
    if accelerator.is_main_process:
        prepare_output_dir(cfg.output_dir, fresh=cfg.do_train and not resume_from)
        write_json(os.path.join(cfg.output_dir, RUN_CONFIG), {**cfg.to_dict(), **run_info})
    accelerator.wait_for_everyone()
    tracker = Tracker(accelerator, cfg, run_info, resume_id=wandb_id)

    # --- train ---
    summary = {}
    if cfg.do_train:
        fingerprint = run_fingerprint(cfg, model, plan)
        summary = train(cfg, plan, accelerator, model, tokenizer, datasets["train"], datasets["dev"], positive_id,
                        tracker, fingerprint, resume_from)
        if accelerator.is_main_process:
            write_json(os.path.join(cfg.output_dir, RESULTS), summary)
        tracker.summarize({k if k.startswith("best_") else f"best_{k}": v for k, v in summary.items()})
        # Drop the training model and optimizer state before the best model is loaded.
        model = None
        accelerator.free_memory()

    # --- test and predict, with the best model loaded once ---
    written = []
    if cfg.do_test or cfg.do_predict:
        model, tokenizer = load_best_model(cfg, accelerator)
        encode_datasets({k: datasets[k] for k in ("test", "predict") if k in datasets}, tokenizer, cfg, accelerator)
        if cfg.do_test:
            summary.update({f"test_{k}": v for k, v in
                            run_test(cfg, plan, accelerator, model, tokenizer, datasets["test"], positive_id,
                                     tracker).items()})
        if cfg.do_predict:
            written = run_predict(cfg, plan, accelerator, model, tokenizer, datasets["predict"], tracker)

    # --- cleanup ---
    if cfg.do_train and cfg.wandb_log_model:
        tracker.log_model(cfg.output_dir, name=f"{cfg.run_name or 'afqmc'}-best")
    model = None
    release_models(accelerator)
    tracker.finish()  # ends the trackers and the process group
    accelerator.print(run_summary(cfg, summary, written, time.time() - started))


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (see errors.py): 2 for a user error, printed as one `error:` line."""
    return exit_status(lambda: run(parse_config(argv)))
