"""The run configuration: one dataclass, validated up front (arguments.py parses it from flags and files).

Flag names follow the tutorial this tool grew from (`--model_checkpoint`, `--batch_size`, ...); the modern
Hugging Face names (`--model_name_or_path`, `--per_device_train_batch_size`, ...) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from .errors import UserError

DEFAULT_BATCH = 4  # the tutorial's per-process training batch
DEFAULT_EVAL_BATCH = 64
TRACKERS = ("wandb", "tensorboard", "mlflow")


def _arg(default, help, aliases=None):
    metadata = {"help": help}
    if aliases:
        metadata["aliases"] = aliases
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    # --- model -------------------------------------------------------------------------------------
    model_checkpoint: str | None = _arg(
        None, "Hub name or local folder of the pretrained encoder (e.g. bert-base-chinese).",
        ["--model_name_or_path"])
    model_type: str | None = _arg(
        None, "Force the architecture when the checkpoint's config lacks a usable model_type "
              "(hfl/chinese-roberta-wwm-ext is a BERT: pass --model_type bert).")
    head: Literal["seq", "cls"] = _arg(
        "seq", "seq: the standard AutoModelForSequenceClassification head (pooler + linear). "
               "cls: the tutorial's head ([CLS] vector, dropout, linear, no pooler; BERT checkpoints only).")
    # --- data --------------------------------------------------------------------------------------
    train_file: str | None = _arg(None, "JSON-lines training pairs.")
    dev_file: str | None = _arg(None, "JSON-lines dev pairs, evaluated during training.", ["--validation_file"])
    test_file: str | None = _arg(None, "JSON-lines labelled pairs for --do_test (and --do_predict's default input).")
    predict_file: str | None = _arg(None, "JSON-lines pairs for --do_predict (no labels needed). Default: --test_file.")
    sentence1_key: str = _arg("sentence1", "JSON key of the first sentence.")
    sentence2_key: str = _arg("sentence2", "JSON key of the second sentence.")
    label_key: str = _arg("label", "JSON key of the label.")
    id_key: str = _arg("id", "JSON key of the example id (copied into CLUE-format predictions).")
    label_list: list[str] = _arg(["0", "1"], "The label values; their order gives the class ids (3 or more for "
                                             "OCNLI/CMNLI-style tasks: macro-F1 and per-class metrics are reported).")
    positive_label: str = _arg("1", "The label whose F1/precision/recall are reported (with 2 labels).")
    task_name: str = _arg("afqmc", "Names the CLUE submission file TASK_predict.json (e.g. ocnli_50k, lcqmc).")
    max_seq_length: int = _arg(128, "Pairs are truncated to this many tokens, special tokens included.",
                               ["--max_length"])
    streaming: bool = _arg(False, "Read --train_file lazily instead of loading it into memory "
                                  "(for files larger than RAM; shuffled through a buffer).")
    shuffle_buffer_size: int = _arg(10000, "Shuffle buffer size in --streaming mode.")
    max_train_samples: int | None = _arg(None, "Use only the first N training pairs (quick runs).")
    max_eval_samples: int | None = _arg(None, "Use only the first N dev pairs (quick runs).")
    group_by_length: bool = _arg(True, "Training batches of similar lengths (shuffled mega-batches sorted by length: "
                                       "little padding, still a fresh random order every epoch).")
    length_group_size: int = _arg(
        100, "With --group_by_length: global batches per mega-batch. Larger means less padding and less random "
             "batch composition (100 batches of 16: about 2%% padding on AFQMC).")
    cache_dir: str | None = _arg(None, "Where tokenised files are cached (default: $XDG_CACHE_HOME/afqmc_dist or "
                                       "~/.cache/afqmc_dist); 'none' disables the cache.")
    # --- run ---------------------------------------------------------------------------------------
    output_dir: str | None = _arg(None, "Where best/, results.json, metrics.jsonl and predictions go.")
    overwrite_output_dir: bool = _arg(False, "Allow --do_train into a non-empty --output_dir.")
    do_train: bool = _arg(False, "Fine-tune, evaluate on --dev_file, keep the best model in OUTPUT_DIR/best.")
    do_test: bool = _arg(False, "Evaluate OUTPUT_DIR/best on the labelled --test_file.")
    do_predict: bool = _arg(False, "Predict --predict_file (or --test_file) with OUTPUT_DIR/best.")
    # --- checkpoints and fault tolerance -------------------------------------------------------------
    checkpointing_steps: str | None = _arg(
        None, "Save the full training state to OUTPUT_DIR/checkpoints/step_N every N optimizer steps, or "
              "'epoch' for the end of every epoch.")
    save_total_limit: int | None = _arg(None, "Keep only the newest K checkpoints (best/ is never deleted).")
    resume_from_checkpoint: str | None = _arg(
        None, "A checkpoint folder, or 'latest' for the newest complete one in OUTPUT_DIR/checkpoints "
              "(a fresh start when there is none yet, so a requeued job can always pass it).")
    metric_for_best_model: Literal["accuracy", "f1", "loss"] = _arg(
        "accuracy", "The dev metric that picks best/ and that early stopping watches (loss: lower is better; f1: "
                    "of --positive_label with 2 labels, macro-F1 with more).")
    early_stopping_patience: int | None = _arg(
        None, "Stop after this many evaluations in a row without a gain of at least --early_stopping_threshold in "
              "--metric_for_best_model.")
    early_stopping_threshold: float = _arg(0.0, "Minimum gain in --metric_for_best_model that counts as an "
                                                "improvement.")
    skip_nonfinite_loss: bool = _arg(
        False, "Skip optimizer steps whose loss is NaN/inf instead of stopping the run (costs a host sync "
               "per step).")
    # --- optimisation ------------------------------------------------------------------------------
    learning_rate: float = _arg(1e-5, "Peak AdamW learning rate.")
    num_train_epochs: int = _arg(3, "Training epochs.")
    max_steps: int | None = _arg(
        None, "Train for exactly this many optimizer steps instead of --num_train_epochs (the schedule, "
              "checkpoints and resume follow it; the last epoch may end part-way).")
    batch_size: int | None = _arg(
        None, f"Training pairs per process and micro-batch (default {DEFAULT_BATCH}, the tutorial's). The global "
              "batch is then batch_size x processes x accumulation, so it grows with the process count.",
        ["--per_device_train_batch_size"])
    global_batch_size: int | None = _arg(
        None, "Training pairs per optimizer step, whatever the number of processes: the per-process batch is "
              "derived as G / (processes x --gradient_accumulation_steps), and the same seed trains the same model "
              "on 1 process, 8, or 1 with accumulation. Instead of --batch_size.")
    dataloader_drop_last: bool = _arg(
        False, "Drop the incomplete last global batch of each epoch (default: train on it, its gradient the mean "
               "over exactly its pairs).")
    eval_batch_size: int | None = _arg(
        None, f"Evaluation/prediction batch size per process (default: the larger of --batch_size and "
              f"{DEFAULT_EVAL_BATCH}; eval batches are sorted by length, so big ones waste little).",
        ["--per_device_eval_batch_size"])
    gradient_accumulation_steps: int = _arg(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _arg(1.0, "Gradient clipping norm (0 disables clipping).")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt"] = _arg(
        "linear", "Learning-rate schedule (transformers' get_scheduler names; those that need no extra arguments).")
    warmup_proportion: float = _arg(0.0, "Fraction of optimizer steps with linear warm-up.", ["--warmup_ratio"])
    warmup_steps: int | None = _arg(None, "Warm-up optimizer steps (instead of --warmup_proportion).")
    weight_decay: float = _arg(0.01, "AdamW weight decay (never applied to biases and LayerNorm weights).")
    adam_beta1: float = _arg(0.9, "AdamW beta1.")
    adam_beta2: float = _arg(0.999, "AdamW beta2.")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon.")
    seed: int = _arg(42, "Seed for weights, shuffling and dropout: a CPU run with the same seed repeats exactly.")
    # --- hardware and logging ----------------------------------------------------------------------
    mixed_precision: Literal["no", "bf16", "fp16"] | None = _arg(
        None, "Override the precision set by the accelerate config / launcher (fp16 needs a GPU).")
    cpu: bool = _arg(False, "Run on the CPU even when a GPU is present.")
    tf32: bool | None = _arg(
        None, "TF32 matmuls for fp32 work on NVIDIA Ampere or newer (default: on when training on a GPU; "
              "recorded in run_config.json).")
    pad_to_multiple_of: int | None = _arg(
        None, "Pad batches to a multiple of this length (default: 8 on a GPU with mixed precision, where "
              "tensor cores want it; 1 otherwise).")
    dataloader_num_workers: int = _arg(0, "Background DataLoader workers (batches are pre-tokenised: 0-2 is enough).")
    torch_compile: bool = _arg(False, "Compile the model with torch.compile (inductor).")
    logging_steps: int = _arg(10, "Log loss and learning rate every N optimizer steps.")
    eval_steps: int | None = _arg(None, "Also evaluate every N optimizer steps (always after each epoch).")
    report_to: list[str] = _arg(
        ["none"], "Experiment trackers: none, or any of wandb, tensorboard, mlflow (space- or comma-separated), or "
                  "all. wandb honours WANDB_MODE=offline; tensorboard writes OUTPUT_DIR/tensorboard; mlflow "
                  "logs to MLFLOW_TRACKING_URI (default sqlite:///OUTPUT_DIR/mlflow.db, artifacts in "
                  "OUTPUT_DIR/mlruns).")
    wandb_project: str = _arg("afqmc-dist", "W&B project name.")
    wandb_entity: str | None = _arg(None, "W&B entity (user or team); default: your W&B default.")
    wandb_group: str | None = _arg(None, "W&B group, e.g. to put the runs of a sweep together.")
    wandb_tags: list[str] = _arg([], "W&B tags.")
    wandb_log_model: bool = _arg(False, "Upload OUTPUT_DIR/best to W&B as a model artifact at the end.")
    require_tracker: bool = _arg(False, "Stop the run if W&B cannot start (default: say why and log locally).")
    run_name: str | None = _arg(None, "Run name shown by the tracker.")

    # ------------------------------------------------------------------------------------------------
    @property
    def trackers(self) -> list[str]:
        """--report_to as a list of tracker names (commas split, `all` expanded, `none` dropped)."""
        names = [name.strip().lower() for value in self.report_to for name in value.split(",") if name.strip()]
        if "all" in names:
            return list(TRACKERS)
        return [name for name in dict.fromkeys(names) if name != "none"]

    @property
    def predict_input(self) -> str | None:
        return self.predict_file or self.test_file

    def batch_plan(self, num_processes: int) -> BatchPlan:
        """The batch sizes of this run on `num_processes` processes; UserError if --global_batch_size does not
        split evenly. Called once, right after the Accelerator is made, before any data is read."""
        accumulation = self.gradient_accumulation_steps
        if self.global_batch_size is None:
            per_device = self.batch_size or DEFAULT_BATCH
        else:
            per_device, rest = divmod(self.global_batch_size, num_processes * accumulation)
            if rest or not per_device:
                raise UserError(f"--global_batch_size {self.global_batch_size} does not split evenly into "
                                f"{num_processes} process(es) x {accumulation} accumulation step(s): use a multiple "
                                f"of {num_processes * accumulation}")
        eval_per_device = self.eval_batch_size or max(per_device, DEFAULT_EVAL_BATCH)
        return BatchPlan(per_device * num_processes * accumulation, per_device, num_processes, accumulation,
                         eval_per_device)

    @property
    def best_model_dir(self) -> str:
        return os.path.join(self.output_dir, "best")

    @property
    def checkpoint_interval(self) -> int | None:
        """--checkpointing_steps as a number of optimizer steps (None: never, or only at epoch ends)."""
        return int(self.checkpointing_steps) if self.checkpointing_steps and self.checkpointing_steps.isdigit() \
            else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise UserError naming the first flag that is wrong. Called once, before any heavy work."""
        if not (self.do_train or self.do_test or self.do_predict):
            raise UserError("nothing to do: pass at least one of --do_train, --do_test, --do_predict")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        needed = []
        if self.do_train:
            needed += [("model_checkpoint", self.model_checkpoint, "--do_train"),
                       ("train_file", self.train_file, "--do_train"), ("dev_file", self.dev_file, "--do_train")]
        if self.do_test:
            needed.append(("test_file", self.test_file, "--do_test"))
        if self.do_predict:
            needed.append(("predict_file", self.predict_input, "--do_predict"))
        for name, value, mode in needed:
            if not value:
                option = "--predict_file (or --test_file)" if name == "predict_file" else f"--{name}"
                raise UserError(f"{option} is required with {mode}")
        for name in ("train_file", "dev_file", "test_file", "predict_file"):
            path = getattr(self, name)
            if path and os.path.isdir(path):
                raise UserError(f"--{name} {path} is a folder, not a file")
            if path and not os.path.isfile(path):
                raise UserError(f"--{name} {path}: no such file")
            if path and not os.access(path, os.R_OK):
                raise UserError(f"--{name} {path}: not readable")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be a whole number from 0 to {2**32 - 1} (what numpy and torch take), "
                            f"got {self.seed}")

        positive = {
            "learning_rate": self.learning_rate, "num_train_epochs": self.num_train_epochs,
            "gradient_accumulation_steps": self.gradient_accumulation_steps, "logging_steps": self.logging_steps,
            "adam_epsilon": self.adam_epsilon, "shuffle_buffer_size": self.shuffle_buffer_size,
            "length_group_size": self.length_group_size,
        }
        optional_positive = {
            "batch_size": self.batch_size, "global_batch_size": self.global_batch_size,
            "eval_batch_size": self.eval_batch_size, "eval_steps": self.eval_steps,
            "max_train_samples": self.max_train_samples, "max_eval_samples": self.max_eval_samples,
            "save_total_limit": self.save_total_limit, "early_stopping_patience": self.early_stopping_patience,
            "pad_to_multiple_of": self.pad_to_multiple_of, "max_steps": self.max_steps,
        }
        for name, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
            if not value > 0:
                raise UserError(f"--{name} must be > 0, got {value}")
        if self.batch_size is not None and self.global_batch_size is not None:
            raise UserError("give --batch_size (per process) or --global_batch_size (per optimizer step), not both")
        if self.max_seq_length < 8:
            raise UserError(f"--max_seq_length must be at least 8, got {self.max_seq_length}")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise UserError(f"--warmup_proportion must be in [0, 1), got {self.warmup_proportion}")
        if self.warmup_steps is not None and (self.warmup_steps < 0 or self.warmup_proportion):
            raise UserError("--warmup_steps must be >= 0, and is given instead of --warmup_proportion, not with it")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        if unknown:
            raise UserError(f"--report_to {unknown[0]!r} is not one of none, {', '.join(TRACKERS)}, all")
        if not self.task_name or not all(c.isalnum() or c in "_-." for c in self.task_name):
            raise UserError(f"--task_name {self.task_name!r}: use letters, digits, '_', '-' or '.' (it names a file)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError("--weight_decay and --max_grad_norm must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if len(self.label_list) < 2 or len(set(self.label_list)) != len(self.label_list):
            raise UserError(f"--label_list needs at least two distinct labels, got {self.label_list}")
        if self.positive_label not in self.label_list:
            raise UserError(f"--positive_label {self.positive_label!r} is not in --label_list {self.label_list}")
        if self.sentence1_key == self.sentence2_key:
            raise UserError("--sentence1_key and --sentence2_key must differ")
        if self.dataloader_num_workers < 0 or self.early_stopping_threshold < 0:
            raise UserError("--dataloader_num_workers and --early_stopping_threshold must be >= 0")
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch" \
                and not (self.checkpointing_steps.isdigit() and int(self.checkpointing_steps) > 0):
            raise UserError(f"--checkpointing_steps must be a number of steps > 0 or 'epoch', "
                            f"got {self.checkpointing_steps!r}")
        if self.resume_from_checkpoint:
            if not self.do_train:
                raise UserError("--resume_from_checkpoint needs --do_train")
            if self.resume_from_checkpoint != "latest" and not os.path.isdir(self.resume_from_checkpoint):
                raise UserError(f"--resume_from_checkpoint {self.resume_from_checkpoint}: no such folder")

        held = {".afqmc.lock", ".afqmc.lock.json"}  # runlock.py's files: they stay when a run ends
        if self.do_train and os.path.isdir(self.output_dir) and set(os.listdir(self.output_dir)) - held \
                and not (self.overwrite_output_dir or self.resume_from_checkpoint):
            raise UserError(f"--output_dir {self.output_dir} is not empty: pass --overwrite_output_dir "
                            "to train into it anyway, or --resume_from_checkpoint to continue its run")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise UserError(f"--output_dir {self.output_dir} exists and is not a folder")
        existing = os.path.abspath(self.output_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
            if existing == os.path.abspath(self.output_dir):
                raise UserError(f"--output_dir {self.output_dir} is not writable")
            raise UserError(f"--output_dir {self.output_dir} cannot be created: {existing} is not a writable folder")


@dataclass(frozen=True)
class BatchPlan:
    """How many pairs go where. One optimizer step trains `global_batch` = `per_device` x `num_processes` x
    `accumulation` pairs; one DataLoader batch (before accelerate's split_batches deals it out to the
    processes) holds `micro_batch` = `per_device` x `num_processes`. Evaluation: `eval_per_device` per process."""

    global_batch: int
    per_device: int
    num_processes: int
    accumulation: int
    eval_per_device: int

    @property
    def micro_batch(self) -> int:
        return self.per_device * self.num_processes

    def describe(self) -> dict:
        """The values logged at start and put in the W&B config."""
        return {"global_batch_size": self.global_batch, "per_device_batch_size": self.per_device,
                "num_processes": self.num_processes, "gradient_accumulation_steps": self.accumulation}
