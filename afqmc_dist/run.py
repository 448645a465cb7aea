"""A run of the tool, phase by phase (cli.py parses and checks the flags first, then calls `run`):

    setup     the accelerator, every input file and the model checked; nothing written
    claim     the output folder: its lock, stale temporaries removed, the resume point, a replaced run set aside
    train     Trainer (training/loop.py) to the end of the schedule; results.json
    test      OUTPUT_DIR/best on --test_file: test_results.json
    predict   OUTPUT_DIR/best on --predict_file: predictions.jsonl (and the CLUE file)
    cleanup   trackers ended, models released, the lock released; the summary printed
"""

from __future__ import annotations

import os
import time

from accelerate.utils import set_seed

from .best_model import load_best_model
from .checkpoints import check_compatible, check_free_space, estimate_checkpoint_bytes, read_state, run_fingerprint
from .config import RunConfig
from .data import PairSchema, encode_datasets, load_datasets, make_eval_dataloader
from .distributed import on_main
from .engine import check_real_parameters, make_accelerator, release_models
from .errors import log_errors_to
from .evaluation import evaluate, loggable, predict
from .files import write_json
from .model import build_model_and_tokenizer
from .outputs import PHASE_CONFIGS, RESULTS, TEST_RESULTS
from .predictions import write_predictions
from .preemption import StopRequests
from .run_folder import RunLock, SetAside, remove_stale_temporaries, resume_point
from .summary import git_commit, run_summary
from .sweep.pruning import TrialReporter
from .tracking import Tracker
from .training.loop import Trainer


def inference_loader(cfg, plan, accelerator, tokenizer, dataset):
    # prepare_data_loader, not prepare: it shards the data without involving the engine (FSDP, DeepSpeed).
    return accelerator.prepare_data_loader(make_eval_dataloader(dataset, cfg, plan, tokenizer, accelerator))


def run_test(cfg, plan, accelerator, model, tokenizer, dataset, positive_id: int, tracker) -> dict:
    """Evaluate the best model on the labelled --test_file; write test_results.json."""
    loader = inference_loader(cfg, plan, accelerator, tokenizer, dataset)
    metrics = evaluate(model, loader, accelerator, positive_id, list(cfg.label_list), desc="test")
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, TEST_RESULTS), {f"test_{k}": v for k, v in metrics.items()})
    tracker.log(loggable(metrics), prefix="test", summary=True)
    accelerator.print(f"test: accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f} ({metrics['count']} pairs)")
    return metrics


def run_predict(cfg, plan, accelerator, model, tokenizer, dataset, tracker) -> list[str]:
    """Predict every line of --predict_file (default --test_file) with the best model, in input order."""
    loader = inference_loader(cfg, plan, accelerator, tokenizer, dataset)
    preds = predict(model, loader, accelerator, desc="predict")
    tracker.log({"samples_per_second": preds.samples_per_second, "count": len(preds)}, prefix="predict")
    written = on_main(accelerator, lambda: write_predictions(cfg.output_dir, dataset.examples, preds,
                                                             cfg.label_list, cfg.id_key, cfg.task_name))
    return written


def prepare_resume(cfg, fingerprint: dict, accelerator) -> tuple[str | None, str | None]:
    """The checkpoint to resume from (None: start fresh, see run_folder.resume_point) and its W&B run id, after
    checking that it belongs to this run (same model, data, global batch, ...)."""
    path = resume_point(cfg, accelerator)
    if path is None:
        return None, None
    state = read_state(path)
    check_compatible(path, state.fingerprint, fingerprint)
    return path, state.wandb_run_id


def claim_output_dir(cfg, accelerator, lock: RunLock) -> None:
    """Lock the folder (main process), or stop naming the run that holds it; remove what a crashed save left."""
    def claim() -> None:
        lock.acquire()
        for path in remove_stale_temporaries(cfg.output_dir):
            print(f"removed {path}, left by a save that was interrupted")

    on_main(accelerator, claim)
    log_errors_to(cfg.output_dir)


def train_phase(cfg, plan, accelerator, model, tokenizer, datasets, positive_id, tracker, fingerprint,
                resume_from, stop_requests) -> dict:
    """Train; write results.json and the trackers' summary."""
    trainer = Trainer(cfg, plan, accelerator, model, tokenizer, datasets["train"], datasets["dev"], positive_id,
                      tracker, fingerprint, resume_from, stop_requests, TrialReporter.from_env(accelerator, cfg))
    summary = trainer.train()
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.output_dir, RESULTS), summary)
    tracker.summarize({k if k.startswith("best_") else f"best_{k}": v for k, v in summary.items()
                       if not isinstance(v, dict)})
    return summary


def run(cfg: RunConfig, stop_requests: StopRequests) -> None:
    started = time.time()
    # --- setup: everything that can be wrong with the inputs is found before anything is written ---
    accelerator, run_info = make_accelerator(cfg)
    stop_requests.attach(accelerator)
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
    trained = None  # a test/predict run's model, loaded (and so checked) before anything is written
    if not cfg.do_train:
        trained = load_best_model(cfg, accelerator)
    run_info = {**plan.describe(), **run_info, "git_commit": git_commit()}
    model = tokenizer = fingerprint = None
    if cfg.do_train:
        # The main process downloads a hub checkpoint first; the others then read it from the cache.
        with accelerator.main_process_first():
            model, tokenizer = build_model_and_tokenizer(cfg)
        check_real_parameters(accelerator, model)
        run_info["num_parameters"] = model.num_parameters()
        fingerprint = run_fingerprint(cfg, model, plan)  # hashes the data files: once per run
        needed = estimate_checkpoint_bytes(model.num_parameters())
        check_free_space(cfg.output_dir, needed if cfg.checkpointing_steps else needed // 4)

    # --- claim the output folder; from here on a stop signal is honoured at the next optimizer step ---
    lock = RunLock(cfg.output_dir)
    try:
        with stop_requests.deferred():
            claim_output_dir(cfg, accelerator, lock)
            resume_from, wandb_id = prepare_resume(cfg, fingerprint, accelerator) if cfg.do_train else (None, None)
            # A fresh run sets a replaced run aside; from here any failure puts it back (run_folder.SetAside).
            with SetAside(cfg.output_dir).guard(accelerator, fresh=cfg.do_train and not resume_from):
                phases =     ["train"] if cfg.do_train else [p for p in ("test", "predict") if getattr(cfg, f"do_{p}")]
                if accelerator.is_main_process:
                    for phase in phases:
                        write_json(os.path.join(cfg.output_dir, PHASE_CONFIGS[phase]), {**cfg.to_dict(), **run_info})
                tracker = Tracker(accelerator, cfg, run_info, resume_id=wandb_id)

                # --- train ---
                summary = {}
                if cfg.do_train:
                    encode_datasets({k: datasets[k] for k in ("train", "dev")}, tokenizer, cfg, accelerator)
                    if cfg.torch_compile:
                        model.compile()  # in place: parameter names (and so saved checkpoints) stay those of the model
                    summary = train_phase(cfg, plan, accelerator, model, tokenizer, datasets, positive_id, tracker,
                                          fingerprint, resume_from, stop_requests)
                    # Drop the training model and optimizer state before the best model is loaded.
                    model = None
                    accelerator.free_memory()

        # --- test and predict, with the best model loaded once ---
        written = []
        if cfg.do_test or cfg.do_predict:
            model, tokenizer = trained or load_best_model(cfg, accelerator)
            trained = None
            encode_datasets({k: datasets[k] for k in ("test", "predict") if k in datasets}, tokenizer, cfg,
                            accelerator)
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
    finally:
        lock.release()
    accelerator.print(run_summary(cfg, summary, written, time.time() - started))
