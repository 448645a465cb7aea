"""The run configuration: one dataclass, validated up front (arguments.py parses it from flags and files).

Each option is defined once, by its field: default, help, the --help group it is listed under, the values it
accepts, and whether a resumed run must keep it (`resumed`: it is in the checkpoint's fingerprint). --help, the
range checks of `validate` and `fingerprint` are derived from the fields; `validate` adds the checks that tie
several options together. Adding an option: one `option(...)` line here, plus the code that uses it.

Flag names follow the tutorial this tool grew from (`--model_checkpoint`, `--batch_size`, ...); the modern
Hugging Face names (`--model_name_or_path`, `--per_device_train_batch_size`, ...) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .errors import UserError

DEFAULT_BATCH = 4  # the tutorial's per-process training batch
DEFAULT_EVAL_BATCH = 64
TRACKERS = ("wandb", "tensorboard", "mlflow")


# The --help groups, in the order --help lists them.
GROUPS = ("model", "data", "training", "training recipes", "evaluation and saving", "checkpoints and resume", "speed",
          "logging and trackers", "distributed")


def option(default, help: str, group: str, *, aliases=(), above=None, at_least=None, below=None, at_most=None,
           resumed: bool | str | Callable = False, path: bool = False):
    """A RunConfig field. `above` / `at_least` / `below` / `at_most`: the range a given value must be in (None:
    unchecked);
    `resumed`: a resumed run must have the same value (True), the same file content ("content"), or the same
    `resumed(cfg)`; `path`: a file or folder (a sweep makes it absolute)."""
    assert group in GROUPS, group
    metadata = {"help": help, "group": group, "aliases": list(aliases), "above": above, "at_least": at_least,
                "below": below, "at_most": at_most, "resumed": resumed, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    # --- model --------------------------------------------------------------------------------------------------------
    model_checkpoint: str | None = option(None,
        "Hub name or local folder of the pretrained encoder (e.g. bert-base-chinese).",
        "model", aliases=["--model_name_or_path"], resumed=True, path=True)
    model_type: str | None = option(None,
        "Force the architecture when the checkpoint's config lacks a usable model_type "
        "(hfl/chinese-roberta-wwm-ext is a BERT: pass --model_type bert).",
        "model")
    head: Literal["seq", "cls"] = option("seq",
        "seq: the standard AutoModelForSequenceClassification head (pooler + linear). cls: the tutorial's "
        "head ([CLS] vector, dropout, linear, no pooler; BERT checkpoints only).",
        "model", resumed=True)
    allow_untested_architecture: bool = option(False,
        "Train a checkpoint of an architecture this tool has not been tested with (tested: bert, roberta, "
        "xlm-roberta, ernie, electra, deberta-v2, megatron-bert, modernbert; see docs/models.md).",
        "model")
    # --- data ---------------------------------------------------------------------------------------------------------
    train_file: str | None = option(None, "JSON-lines training pairs.", "data", resumed="content", path=True)
    dev_file: str | None = option(None,
        "JSON-lines dev pairs, evaluated during training.",
        "data", aliases=["--validation_file"], resumed="content", path=True)
    test_file: str | None = option(None,
        "JSON-lines labelled pairs for --do_test (and --do_predict's default input).",
        "data", path=True)
    predict_file: str | None = option(None,
        "JSON-lines pairs for --do_predict (no labels needed). Default: --test_file.",
        "data", path=True)
    sentence1_key: str = option("sentence1", "JSON key of the first sentence.", "data")
    sentence2_key: str = option("sentence2", "JSON key of the second sentence.", "data")
    label_key: str = option("label", "JSON key of the label.", "data")
    id_key: str = option("id", "JSON key of the example id (copied into CLUE-format predictions).", "data")
    label_list: list[str] = option(["0", "1"],
        "The label values; their order gives the class ids (3 or more for OCNLI/CMNLI-style tasks: macro-F1 "
        "and per-class metrics are reported).",
        "data", resumed=True)
    positive_label: str = option("1", "The label whose F1/precision/recall are reported (with 2 labels).", "data")
    task_name: str = option("afqmc",
        "Names the CLUE submission file TASK_predict.json (e.g. ocnli_50k, lcqmc).",
        "data")
    max_seq_length: int = option(128,
        "Pairs are truncated to this many tokens, special tokens included.",
        "data", aliases=["--max_length"], at_least=8, resumed=True)
    streaming: bool = option(False,
        "Read --train_file lazily instead of loading it into memory (for files larger than RAM; shuffled "
        "through a buffer).",
        "data", resumed=True)
    shuffle_buffer_size: int = option(10000, "Shuffle buffer size in --streaming mode.", "data", above=0)
    max_train_samples: int | None = option(None,
        "Use only the first N training pairs (quick runs).",
        "data", above=0, resumed=True)
    max_eval_samples: int | None = option(None, "Use only the first N dev pairs (quick runs).", "data", above=0)
    cache_dir: str | None = option(None,
        "Where tokenised files are cached (default: $XDG_CACHE_HOME/afqmc_dist or ~/.cache/afqmc_dist); "
        "'none' disables the cache.",
        "data", path=True)
    # --- training -----------------------------------------------------------------------------------------------------
    do_train: bool = option(False,
        "Fine-tune, evaluate on --dev_file, keep the best model in OUTPUT_DIR/best.",
        "training")
    learning_rate: float = option(1e-05, "Peak AdamW learning rate.", "training", above=0)
    num_train_epochs: int = option(3, "Training epochs.", "training", above=0)
    max_steps: int | None = option(None,
        "Train for exactly this many optimizer steps instead of --num_train_epochs (the schedule, checkpoints "
        "and resume follow it; the last epoch may end part-way).",
        "training", above=0)
    batch_size: int | None = option(None,
        "Training pairs per process and micro-batch (default 4, the tutorial's). The global batch is then "
        "batch_size x processes x accumulation, so it grows with the process count.",
        "training", aliases=["--per_device_train_batch_size"], above=0)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", "training", above=0)
    dataloader_drop_last: bool = option(False,
        "Drop the incomplete last global batch of each epoch (default: train on it, its gradient the mean "
        "over exactly its pairs).",
        "training", resumed=True)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables clipping).", "training", at_least=0.0)
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt"] = option("linear",
        "Learning-rate schedule (transformers' get_scheduler names; those that need no extra arguments).",
        "training")
    warmup_proportion: float = option(0.0,
        "Fraction of optimizer steps with linear warm-up.",
        "training", aliases=["--warmup_ratio"], at_least=0.0, below=1.0)
    warmup_steps: int | None = option(None,
        "Warm-up optimizer steps (instead of --warmup_proportion).",
        "training", at_least=0)
    weight_decay: float = option(0.01,
        "AdamW weight decay (never applied to biases and LayerNorm weights).",
        "training", at_least=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1.", "training", at_least=0.0, below=1.0)
    adam_beta2: float = option(0.999, "AdamW beta2.", "training", at_least=0.0, below=1.0)
    adam_epsilon: float = option(1e-08, "AdamW epsilon.", "training", above=0)
    seed: int = option(42,
        "Seed for weights, shuffling and dropout: a CPU run with the same seed repeats exactly.",
        "training", at_least=0, below=2**32, resumed=True)
    skip_nonfinite_loss: bool = option(False,
        "Skip optimizer steps whose loss is NaN/inf instead of stopping the run (costs a host sync per step).",
        "training")
    # --- training recipes (all off by default) ------------------------------------------------------------------------
    class_weights: str | None = option(None,
        "Weight each pair's loss by its label: 'auto' (N / (labels x N_label) from the training file, so rarer "
        "labels weigh more and the mean weight is 1; recorded in run_config.json) or one weight per label, "
        "'W0,W1,...' in --label_list order. The loss stays the mean over the global batch.",
        "training recipes", resumed=True)
    label_smoothing: float = option(0.0,
        "Label smoothing of the cross-entropy (0.1 is common).",
        "training recipes", at_least=0.0, below=1.0, resumed=True)
    layerwise_lr_decay: float | None = option(None,
        "Layer-wise learning-rate decay F: the head gets --learning_rate, the top encoder layer x F, the next "
        "x F^2, ..., the embeddings x F^(layers+1) (0.9-0.95 is common).",
        "training recipes", above=0.0, at_most=1.0, resumed=True)
    ema_decay: float | None = option(None,
        "Keep an exponential moving average of the weights (e.g. 0.999), updated after every optimizer step; "
        "evaluation and best/ use it. Saved in every checkpoint.",
        "training recipes", above=0.0, below=1.0, resumed=True)
    adversarial: Literal["fgm"] | None = option(None,
        "Adversarial training on the word embeddings: 'fgm' (Fast Gradient Method: a second forward and backward "
        "with the embeddings moved by --adversarial_epsilon along their gradient, then put back exactly).",
        "training recipes", resumed=True)
    adversarial_epsilon: float = option(1.0,
        "The size of FGM's step on the embeddings (the norm of the perturbation).",
        "training recipes", above=0.0, resumed=lambda cfg: cfg.adversarial_epsilon if cfg.adversarial else None)
    rdrop_alpha: float = option(0.0,
        "R-Drop: each pair goes through the model twice (two dropout masks) and the loss adds ALPHA x the "
        "symmetric KL divergence of the two predictions (0: off; 1-5 is common).",
        "training recipes", at_least=0.0, resumed=True)
    # --- evaluation and saving ----------------------------------------------------------------------------------------
    output_dir: str | None = option(None,
        "Where best/, results.json, metrics.jsonl and predictions go.",
        "evaluation and saving")
    overwrite_output_dir: bool = option(False,
        "Allow --do_train into a non-empty --output_dir.",
        "evaluation and saving")
    do_test: bool = option(False, "Evaluate OUTPUT_DIR/best on the labelled --test_file.", "evaluation and saving")
    do_predict: bool = option(False,
        "Predict --predict_file (or --test_file) with OUTPUT_DIR/best.",
        "evaluation and saving")
    eval_steps: int | None = option(None,
        "Also evaluate every N optimizer steps (always after each epoch).",
        "evaluation and saving", above=0)
    eval_batch_size: int | None = option(None,
        "Evaluation/prediction batch size per process (default: the larger of --batch_size and 64; eval "
        "batches are sorted by length, so big ones waste little).",
        "evaluation and saving", aliases=["--per_device_eval_batch_size"], above=0)
    metric_for_best_model: Literal["accuracy", "f1", "loss"] = option("accuracy",
        "The dev metric that picks best/ and that early stopping watches (loss: lower is better; f1: of "
        "--positive_label with 2 labels, macro-F1 with more).",
        "evaluation and saving")
    early_stopping_patience: int | None = option(None,
        "Stop after this many evaluations in a row without a gain of at least --early_stopping_threshold in "
        "--metric_for_best_model.",
        "evaluation and saving", above=0)
    early_stopping_threshold: float = option(0.0,
        "Minimum gain in --metric_for_best_model that counts as an improvement.",
        "evaluation and saving", at_least=0.0)
    predict_piece_size: int = option(10000,
        "--do_predict writes OUTPUT_DIR/predictions.jsonl in pieces of this many pairs (in "
        "predictions.jsonl.parts/ until it is whole): a run stopped while predicting keeps its complete pieces "
        "when it runs again.",
        "evaluation and saving", above=0)
    # --- checkpoints and resume ---------------------------------------------------------------------------------------
    checkpointing_steps: str | None = option(None,
        "Save the full training state to OUTPUT_DIR/checkpoints/step_N every N optimizer steps, or 'epoch' "
        "for the end of every epoch.",
        "checkpoints and resume")
    save_total_limit: int | None = option(None,
        "Keep only the newest K checkpoints (best/ is never deleted).",
        "checkpoints and resume", above=0)
    resume_from_checkpoint: str | None = option(None,
        "A checkpoint folder, or 'latest' for the newest complete one in OUTPUT_DIR/checkpoints (a fresh "
        "start when there is none yet, so a requeued job can always pass it).",
        "checkpoints and resume")
    # --- speed --------------------------------------------------------------------------------------------------------
    group_by_length: bool = option(True,
        "Training batches of similar lengths (shuffled mega-batches sorted by length: little padding, still a "
        "fresh random order every epoch).",
        "speed", resumed=True)
    length_group_size: int = option(100,
        "With --group_by_length: global batches per mega-batch. Larger means less padding and less random "
        "batch composition (100 batches of 16: about 2%% padding on AFQMC).",
        "speed", above=0, resumed=lambda cfg: cfg.length_group_size if cfg.group_by_length else None)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = option(None,
        "Override the precision set by the accelerate config / launcher (fp16 needs a GPU).",
        "speed")
    tf32: bool | None = option(None,
        "TF32 matmuls for fp32 work on NVIDIA Ampere or newer (default: on when training on a GPU; recorded "
        "in run_config.json).",
        "speed")
    pad_to_multiple_of: int | None = option(None,
        "Pad batches to a multiple of this length (default: 8 on a GPU with mixed precision, where tensor "
        "cores want it; 1 otherwise).",
        "speed", above=0)
    dataloader_num_workers: int = option(0,
        "Background DataLoader workers (batches are pre-tokenised: 0-2 is enough).",
        "speed", at_least=0)
    torch_compile: bool = option(False, "Compile the model with torch.compile (inductor).", "speed")
    # --- logging and trackers -----------------------------------------------------------------------------------------
    logging_steps: int = option(10,
        "Log loss and learning rate every N optimizer steps.",
        "logging and trackers", above=0)
    report_to: list[str] = option(["none"],
        "Experiment trackers: none, or any of wandb, tensorboard, mlflow (space- or comma-separated), or all. "
        "wandb honours WANDB_MODE=offline; tensorboard writes OUTPUT_DIR/tensorboard; mlflow logs to "
        "MLFLOW_TRACKING_URI (default sqlite:///OUTPUT_DIR/mlflow.db, artifacts in OUTPUT_DIR/mlruns).",
        "logging and trackers")
    wandb_project: str = option("afqmc-dist", "W&B project name.", "logging and trackers")
    wandb_entity: str | None = option(None,
        "W&B entity (user or team); default: your W&B default.",
        "logging and trackers")
    wandb_group: str | None = option(None,
        "W&B group, e.g. to put the runs of a sweep together.",
        "logging and trackers")
    wandb_tags: list[str] = option([], "W&B tags.", "logging and trackers")
    wandb_log_model: bool = option(False,
        "Upload OUTPUT_DIR/best to W&B as a model artifact at the end.",
        "logging and trackers")
    require_tracker: bool = option(False,
        "Stop the run if W&B cannot start (default: say why and log locally).",
        "logging and trackers")
    run_name: str | None = option(None, "Run name shown by the tracker.", "logging and trackers")
    # --- distributed --------------------------------------------------------------------------------------------------
    global_batch_size: int | None = option(None,
        "Training pairs per optimizer step, whatever the number of processes: the per-process batch is "
        "derived as G / (processes x --gradient_accumulation_steps), and the same seed trains the same model "
        "on 1 process, 8, or 1 with accumulation. Instead of --batch_size.",
        "distributed", above=0)
    cpu: bool = option(False, "Run on the CPU even when a GPU is present.", "distributed")

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

    def explicit_class_weights(self) -> list[float] | None:
        """--class_weights W0,W1,... as numbers, one per label (UserError naming what is wrong); None for no weights
        or 'auto' (training/loss.py counts the training file's labels)."""
        if self.class_weights in (None, "auto"):
            return None
        try:
            values = [float(v) for v in self.class_weights.split(",")]
        except ValueError:
            raise UserError(f"--class_weights must be 'auto' or one number per label (W0,W1,...), got "
                            f"{self.class_weights!r}") from None
        if len(values) != len(self.label_list):
            raise UserError(f"--class_weights gives {len(values)} weight(s) for {len(self.label_list)} labels "
                            f"{list(self.label_list)}: give one per label, in that order")
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise UserError(f"--class_weights must be positive finite numbers, got {self.class_weights!r}")
        return values

    def fingerprint(self) -> dict:
        """What a resumed run must keep (the options defined with `resumed`): their values, or the sha256 of
        their files' content. The rest of the fingerprint (the model's size, the global batch) is added by
        checkpoints.run_fingerprint."""
        from .manifest import file_sha256

        values = {}
        for f in dataclasses.fields(self):
            resumed, value = f.metadata.get("resumed"), getattr(self, f.name)
            if resumed == "content":
                values[f.name] = file_sha256(value)
            elif callable(resumed):
                values[f.name] = resumed(self)
            elif resumed:
                values[f.name] = list(value) if isinstance(value, list) else value
        return values

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
            check_range(f, getattr(self, f.name))
        if self.batch_size is not None and self.global_batch_size is not None:
            raise UserError("give --batch_size (per process) or --global_batch_size (per optimizer step), not both")
        if self.warmup_steps is not None and self.warmup_proportion:
            raise UserError("--warmup_steps is given instead of --warmup_proportion, not with it")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        if unknown:
            raise UserError(f"--report_to {unknown[0]!r} is not one of none, {', '.join(TRACKERS)}, all")
        if not self.task_name or not all(c.isalnum() or c in "_-." for c in self.task_name):
            raise UserError(f"--task_name {self.task_name!r}: use letters, digits, '_', '-' or '.' (it names a file)")
        if len(self.label_list) < 2 or len(set(self.label_list)) != len(self.label_list):
            raise UserError(f"--label_list needs at least two distinct labels, got {self.label_list}")
        if self.positive_label not in self.label_list:
            raise UserError(f"--positive_label {self.positive_label!r} is not in --label_list {self.label_list}")
        self.explicit_class_weights()
        if self.sentence1_key == self.sentence2_key:
            raise UserError("--sentence1_key and --sentence2_key must differ")
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch" \
                and not (self.checkpointing_steps.isdigit() and int(self.checkpointing_steps) > 0):
            raise UserError(f"--checkpointing_steps must be a number of steps > 0 or 'epoch', "
                            f"got {self.checkpointing_steps!r}")
        if self.resume_from_checkpoint:
            if not self.do_train:
                raise UserError("--resume_from_checkpoint needs --do_train")
            if self.resume_from_checkpoint != "latest" and not os.path.isdir(self.resume_from_checkpoint):
                raise UserError(f"--resume_from_checkpoint {self.resume_from_checkpoint}: no such folder")

        from .run_folder import HOLDER_FILE, LOCK_FILE

        held = {LOCK_FILE, HOLDER_FILE}  # the folder's lock: it stays when a run ends
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


def check_range(f: dataclasses.Field, value) -> None:
    """UserError if the value of option `f` is not a finite number or not in the range its field declares."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--{f.name} must be a finite number, got {value}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    above, at_least, below, at_most = (f.metadata.get(key) for key in ("above", "at_least", "below", "at_most"))
    # Each side: (its bracket for an interval, the same as a comparison, whether the value is within it).
    low = (f"({above:g}", f"> {above:g}", value > above) if above is not None else \
        (f"[{at_least:g}", f">= {at_least:g}", value >= at_least) if at_least is not None else None
    high = (f"{below:g})", f"< {below:g}", value < below) if below is not None else \
        (f"{at_most:g}]", f"<= {at_most:g}", value <= at_most) if at_most is not None else None
    if low and high and not (low[2] and high[2]):
        whole = isinstance(at_least, int) and isinstance(below, int)
        span = f"a whole number from {at_least} to {below - 1}" if whole else f"in {low[0]}, {high[0]}"
        raise UserError(f"--{f.name} must be {span}, got {value}")
    for side in (low, high):
        if side and not side[2]:
            raise UserError(f"--{f.name} must be {side[1]}, got {value}")


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
