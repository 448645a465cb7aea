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
from .data import PairSchema, encode_datasets, load_datasets
from .distributed import on_main
from .engine import check_real_parameters, make_accelerator, release_models
from .errors import log_errors_to
from .evaluation import loggable
from .files import write_json
from .inference.engine import PieceRunner
from .inference.jobs import evaluate_file, predict_to_file
from .inference.scan import scan
from .model import build_model_and_tokenizer
from .outputs import PHASE_CONFIGS, PREDICTIONS, RESULTS, TEST_RESULTS
from .preemption import StopRequests
from .run_folder import RunLock, SetAside, find_best_dir, remove_stale_temporaries, resume_point
from .summary import git_commit, run_summary
from .sweep.pruning import TrialReporter
from .tracking import Tracker
from .training.loop import Trainer
from .training.loss import class_weights


class Run:
    """One invocation of the tool on every rank: `execute` runs the phases of the module docstring in order."""

    def __init__(self, cfg: RunConfig, stop_requests: StopRequests):
        self.cfg, self.stop_requests = cfg, stop_requests
        self.model = self.tokenizer = self.fingerprint = self.trained = self.tracker = None
        self.resume_from = self.wandb_id = None
        self.summary: dict = {}
        self.written: list[str] = []

    def execute(self) -> None:
        cfg, started = self.cfg, time.time()
        self.setup()
        lock = RunLock(cfg.output_dir)
        try:
            # From the claim on, a stop signal is honoured at the next optimizer step (a checkpoint saved).
            with self.stop_requests.deferred():
                self.claim(lock)
                # A fresh run sets a replaced run aside; from here any failure puts it back (run_folder.SetAside).
                with SetAside(cfg.output_dir).guard(self.accelerator, fresh=cfg.do_train and not self.resume_from):
                    self.start_tracking()
                    if cfg.do_train:
                        self.train()
            if cfg.do_test or cfg.do_predict:
                self.test_and_predict()
            self.cleanup()
        finally:
            lock.release()
        self.accelerator.print(run_summary(cfg, self.summary, self.written, time.time() - started))

    # --- setup: everything that can be wrong with the inputs is found before anything is written -----------------

    def setup(self) -> None:
        cfg = self.cfg
        self.accelerator, run_info = make_accelerator(cfg)
        accelerator = self.accelerator
        self.stop_requests.attach(accelerator)
        self.plan = plan = cfg.batch_plan(accelerator.num_processes)
        set_seed(cfg.seed)
        accelerator.print(f"{accelerator.num_processes} process(es), device {accelerator.device.type}, "
                          f"precision {accelerator.mixed_precision}, distributed {accelerator.distributed_type}")
        if cfg.do_train:
            accelerator.print(f"global batch {plan.global_batch} = {plan.per_device} per process x "
                              f"{plan.num_processes} process(es) x {plan.accumulation} accumulation step(s)")
        self.schema = schema = PairSchema.from_config(cfg)
        self.positive_id = schema.label2id[cfg.positive_label]
        self.datasets = load_datasets(cfg, schema)
        # --class_weights auto: counted from the training file now (a label without pairs stops the run here).
        self.class_weights = class_weights(cfg, self.datasets["train"].label_counts) if cfg.do_train else None
        self.indexes = {}  # the test and predict files: checked in one streaming pass each (inference/scan.py)
        for phase, path, labelled in (("test", cfg.test_file, True), ("predict", cfg.predict_input, False)):
            if getattr(cfg, f"do_{phase}"):
                self.indexes[phase] = on_main(accelerator, lambda path=path, labelled=labelled: scan(
                    path, schema, labelled, cfg.predict_piece_size))
        if not cfg.do_train:  # a test/predict run's model, loaded (and so checked) before anything is written
            self.trained = load_best_model(cfg, accelerator)
        self.run_info = {**plan.describe(), **run_info, "git_commit": git_commit()}
        if self.class_weights:
            self.run_info["class_weight_values"] = self.class_weights
        if cfg.do_train:
            self.setup_model()

    def setup_model(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        # The main process downloads a hub checkpoint first; the others then read it from the cache.
        with accelerator.main_process_first():
            self.model, self.tokenizer = build_model_and_tokenizer(cfg)
        check_real_parameters(accelerator, self.model)
        self.run_info.update(num_parameters=self.model.num_parameters(), model_type=self.model.config.model_type,
                             attn_implementation=self.model.config._attn_implementation)
        self.fingerprint = run_fingerprint(cfg, self.model, self.plan)  # hashes the data files: once per run
        needed = estimate_checkpoint_bytes(self.model.num_parameters())
        check_free_space(cfg.output_dir, needed if cfg.checkpointing_steps else needed // 4)

    # --- claim the output folder ------------------------------------------------------------------------------

    def claim(self, lock: RunLock) -> None:
        """Lock the folder (main process), or stop naming the run that holds it; remove what a crashed save left;
        find where training starts (a checkpoint that belongs to this run, or afresh)."""
        cfg, accelerator = self.cfg, self.accelerator

        def take() -> None:
            lock.acquire()
            for path in remove_stale_temporaries(cfg.output_dir):
                print(f"removed {path}, left by a save that was interrupted")

        on_main(accelerator, take)
        log_errors_to(cfg.output_dir)
        if cfg.do_train:
            self.resume_from = resume_point(cfg, accelerator)
            if self.resume_from:
                state = read_state(self.resume_from)
                check_compatible(self.resume_from, state.fingerprint, self.fingerprint)
                self.wandb_id = state.wandb_run_id

    def start_tracking(self) -> None:
        """The phase's record (run_config.json, or test_/predict_config.json) and the trackers."""
        cfg = self.cfg
        phases = ["train"] if cfg.do_train else [p for p in ("test", "predict") if getattr(cfg, f"do_{p}")]
        if self.accelerator.is_main_process:
            for phase in phases:
                write_json(os.path.join(cfg.output_dir, PHASE_CONFIGS[phase]), {**cfg.to_dict(), **self.run_info})
        self.tracker = Tracker(self.accelerator, cfg, self.run_info, resume_id=self.wandb_id)

    # --- train ------------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, accelerator, datasets = self.cfg, self.accelerator, self.datasets
        encode_datasets({k: datasets[k] for k in ("train", "dev")}, self.tokenizer, cfg, accelerator)
        if cfg.torch_compile:
            self.model.compile()  # in place: parameter names (and so saved checkpoints) stay those of the model
        trainer = Trainer(cfg, self.plan, accelerator, self.model, self.tokenizer, datasets["train"], datasets["dev"],
                          self.positive_id, self.tracker, self.fingerprint, self.resume_from, self.stop_requests,
                          TrialReporter.from_env(accelerator, cfg), class_weights=self.class_weights)
        self.summary = trainer.train()
        if accelerator.is_main_process:
            write_json(os.path.join(cfg.output_dir, RESULTS), self.summary)
        self.tracker.summarize({k if k.startswith("best_") else f"best_{k}": v for k, v in self.summary.items()
                                if not isinstance(v, dict)})
        # Drop the training model and optimizer state before the best model is loaded.
        self.model = trainer = None
        accelerator.free_memory()

    # --- test and predict, with the best model loaded once ----------------------------------------------------

    def test_and_predict(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        model, tokenizer = self.trained or load_best_model(cfg, accelerator)
        self.trained = None
        if cfg.do_test:
            metrics = self.test(model, tokenizer)
            self.summary.update({f"test_{k}": v for k, v in metrics.items()})
        if cfg.do_predict:
            self.written = self.predict(model, tokenizer)

    def runner(self, model, tokenizer, phase: str) -> PieceRunner:
        """The model over the test or predict file, streamed in pieces (inference/engine.py)."""
        labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
        return PieceRunner.of([model], [tokenizer], self.accelerator, self.indexes[phase], self.schema,
                              phase == "test", self.cfg, self.plan.eval_per_device, labels)

    def test(self, model, tokenizer) -> dict:
        """Evaluate the best model on the labelled --test_file; write test_results.json."""
        cfg, accelerator = self.cfg, self.accelerator
        metrics = evaluate_file(self.runner(model, tokenizer, "test"), self.positive_id, list(cfg.label_list))
        if accelerator.is_main_process:
            write_json(os.path.join(cfg.output_dir, TEST_RESULTS), {f"test_{k}": v for k, v in metrics.items()})
        self.tracker.log(loggable(metrics), prefix="test", summary=True)
        accelerator.print(f"test: accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f} "
                          f"({metrics['count']} pairs)")
        return metrics

    def predict(self, model, tokenizer) -> list[str]:
        """Predict every line of --predict_file (default --test_file) with the best model, in input order, into
        OUTPUT_DIR/predictions.jsonl through its pieces (inference/pieces.py: a rerun keeps the complete ones)."""
        cfg = self.cfg
        output = os.path.join(cfg.output_dir, PREDICTIONS)
        written, done = predict_to_file(self.runner(model, tokenizer, "predict"), output,
                                        [find_best_dir(cfg.output_dir)], restart=False, task_name=cfg.task_name,
                                        stop_requests=self.stop_requests)
        self.tracker.log({"samples_per_second": done.pairs_per_second, "count": done.pairs}, prefix="predict")
        return written

    # --- cleanup ----------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        cfg = self.cfg
        if cfg.do_train and cfg.wandb_log_model:
            self.tracker.log_model(cfg.output_dir, name=f"{cfg.run_name or 'afqmc'}-best")
        self.model = None
        release_models(self.accelerator)
        self.tracker.finish()  # ends the trackers and the process group


def run(cfg: RunConfig, stop_requests: StopRequests) -> None:
    Run(cfg, stop_requests).execute()
