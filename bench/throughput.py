"""Training, evaluation and prediction throughput on AFQMC: this tool vs the tutorial loop vs the HF Trainer.

Reproduce, from the repository root (the bench sets HF_HUB_OFFLINE=1 and WANDB_MODE=disabled for its children):

    python bench/throughput.py --quick                        # smoke run of every row, < 3 minutes
    python bench/throughput.py                                # small and base, fp32 and bf16, 3 repeats (the table
                                                              # in the README: 44 minutes on 2 CPU cores, bf16 skipped)
    python bench/throughput.py --models small --repeats 5     # small model only (~15 minutes)
    python bench/throughput.py --accuracy --seeds 1,2 --accuracy_learning_rate 5e-4   # one AFQMC epoch per seed

Results: a markdown table per model on stdout; every raw number in bench/results/throughput.json
(bench/results/accuracy.json for --accuracy; --quick writes under bench/.cache/ instead). Progress goes to
stderr; each child's stdout/stderr, spec and result are kept under bench/.cache/runs/.

Rows. Each run of a row is a separate child process; all rows use the same data subsets (the first N pairs of
each file), model folder, seed and thread count; learning rate 1e-5, batch 16, max_seq_length 128, one epoch.
Every row trains `AutoModelForSequenceClassification` (BERT + pooler + dropout + linear), so that the FLOPs are
the same in every row; the tutorial's own head ([CLS] vector without the pooler) differs only by the pooler.

    tutorial          the well-known AFQMC fine-tuning tutorial loop, re-implemented here: a Dataset of raw JSON
                      pairs, a collate_fn that tokenises each batch (padding=True), DataLoader(shuffle=True),
                      fp32, torch.optim.AdamW + get_scheduler("linear"), `loss.item()` every step (its progress
                      bar is left out), dev evaluation in file order at the training batch size under no_grad,
                      prediction one pair at a time. bf16: forward passes under
                      torch.autocast("cpu", dtype=torch.bfloat16).
    trainer_grouped   transformers.Trainer with its best settings for this job: pre-tokenised pairs,
                      DataCollatorWithPadding, train_sampling_strategy="group_by_length" (the transformers 5 name
                      of group_by_length=True), use_cpu=True, bf16=True for bf16, its default optimizer
                      (adamw_torch_fused), no saving, logging or reporting; trainer.evaluate / trainer.predict at
                      the eval batch size (--eval_batch_size, default 64 = the tool's default). In transformers 5
                      this strategy also orders eval and predict batches by length (LengthGroupedSampler), so
                      trainer.predict returns its rows out of input order.
    trainer_random    the same with train_sampling_strategy="random" (the Trainer's default).
    tool_default      `python train.py ... --do_train --do_predict` exactly as a user runs it, default flags
                      (bf16: --mixed_precision bf16); its numbers are read from OUTPUT_DIR/results.json and
                      OUTPUT_DIR/metrics.jsonl.
    tool_fast         the same plus --tool_fast_flags (default: the whole epoch in one length-sorted group, eval
                      batches of 32, the fastest eval batch measured on a 2-core CPU). --torch_compile is not a
                      default here: on a CPU it is slower (see the README); with it, each run compiles from an
                      empty compile cache, i.e. as a first run (--quick shares one cache across its runs).

bf16 rows run only where bf16 is real: when the machine's measured bf16 matmul peak is under half its fp32 peak
(no AVX512-bf16/AMX: bf16 is emulated), they are reported as skipped with both peaks, not run for hours.

Columns: training samples/s, real (non-padding) tokens/s and the padding fraction of the training batches,
eval and predict samples/s, peak RSS of the row's process (os.wait4 on the child gives its own ru_maxrss;
processes it spawns, such as torch.compile workers, are not counted), model FLOP utilisation (MFU) of training,
and each row's samples/s over the tutorial fp32 row's, for train, eval and predict.

FLOPs (the same formula for every row, so MFU ranks rows exactly as real tokens/s does):
    training FLOPs per real token = 6 * N + 12 * L * H * S
    forward FLOPs per real token  = 2 * N + 4 * L * H * S      (eval / predict MFU, in the JSON only)
where N = parameters outside the embedding layer (encoder + pooler + classifier), L = layers, H = hidden size,
S = mean real tokens per pair of that split (truncated at max_seq_length). Padding tokens do no useful work.
MFU = real tokens/s * FLOPs per token / machine peak. The peak is measured here: the best of several dense
square matmuls (after a warm-up, same thread count), in fp32 and in bf16, before and after the rows (the best
is kept); each row is compared with the peak of its own precision. The same numbers give the ceilings printed
under each table: the eval and predict samples/s a run would reach at 100% of the fp32 peak (forward FLOPs per
real token x real tokens per pair), and what that is against the tutorial's own rates: a target above those
ratios cannot be met on this machine without changing what is computed.

Timing excludes start-up. Imports, model loading, pre-tokenisation and optimizer creation are not what a long run
spends its time on, and they would swamp a one-minute measurement. For tutorial and Trainer rows the clock starts
once model, optimizer and data are set up and stops after the last optimizer step (a TrainerCallback for the
Trainer); eval and predict are timed separately. The tool reports the same interval itself (`train_runtime`:
training steps only, so any compilation in the first steps is inside it; the JSON also keeps its speed after the
first logging window). Every row runs --repeats times, rows interleaved within each repeat; the table shows
medians, the JSON keeps every run with the load average before it and the child's CPU seconds. Other work on the
machine slows a row many times over (OpenMP threads spin-wait when cores are shared): run the bench on an idle
machine, and distrust a run much slower than its repeats.

--accuracy: the small model on real AFQMC (a full training epoch unless --accuracy_train_samples), the full dev
set, lr 5e-5 (a random-init model barely moves at 1e-5), batch 16, for each of --seeds: the tutorial loop vs
the tool's defaults; prints dev accuracy and F1 of label "1".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CACHE = BENCH / ".cache"
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_DATA = REPO / "afqmc_dist" / "sample_data"

MODEL_SHAPES = {
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072},
}
# (train, eval, predict) pairs per model: about a minute per training row on a 2-core CPU.
DEFAULT_SIZES = {"small": (1600, 1000, 300), "base": (400, 300, 100)}
QUICK_SIZES = {"small": (48, 32, 8), "base": (16, 16, 4)}
ROWS = ("tutorial", "trainer_grouped", "trainer_random", "tool_default", "tool_fast")
PRECISIONS = ("fp32", "bf16")
TOOL_TRAIN_KEYS = ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_padding_fraction")
TRAINER_EVAL_BATCH = 64  # the tool's default eval batch; the Trainer's own default (8) would handicap it


class RowFailed(Exception):
    """A row could not be measured; the message is what the table shows."""


# ================================================================================================ shared helpers

def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy_f1(preds: list[int], labels: list[int], positive: int = 1) -> tuple[float, float]:
    """Accuracy, and F1 of the positive class (label "1" on AFQMC)."""
    tp = sum(p == positive and y == positive for p, y in zip(preds, labels))
    fp = sum(p == positive and y != positive for p, y in zip(preds, labels))
    fn = sum(p != positive and y == positive for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return sum(p == y for p, y in zip(preds, labels)) / len(labels), f1


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ================================================================================================ worker: tutorial

class AFQMC:
    """The tutorial's dataset: every JSON line of the file, kept raw, indexed by line number."""

    def __init__(self, data_file: str):
        self.data = dict(enumerate(read_jsonl(data_file)))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict:
        return self.data[idx]


def tutorial_collate(batch_samples: list[dict], tokenizer, max_length: int):
    """The tutorial's collate_fn: tokenise the batch's pairs, padded to the longest, and stack the labels."""
    import torch

    x = tokenizer([s["sentence1"] for s in batch_samples], [s["sentence2"] for s in batch_samples],
                  padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    y = torch.tensor([int(s["label"]) for s in batch_samples])
    return x, y


def autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def tutorial_train_loop(dataloader, model, loss_fn, optimizer, lr_scheduler, precision: str) -> dict:
    """One epoch of the tutorial's train_loop, timed from the first batch to the last optimizer step."""
    real_tokens = all_tokens = samples = 0
    total_loss = 0.0
    model.train()
    start = time.perf_counter()
    steps = 0
    for x, y in dataloader:
        with autocast(precision):
            pred = model(**x).logits
        loss = loss_fn(pred.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        total_loss += loss.item()  # the tutorial's running loss: a host sync every step
        mask = x["attention_mask"]
        real_tokens += int(mask.sum())
        all_tokens += mask.numel()
        samples += len(y)
        steps += 1
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "train_samples": samples, "train_real_tokens": real_tokens,
            "train_all_tokens": all_tokens, "train_loss": total_loss / steps}


def tutorial_test_loop(dataloader, model, precision: str) -> tuple[list[int], list[int], float, float]:
    """The tutorial's test_loop (file order, training batch size, no_grad): predictions, labels, mean
    cross-entropy (not in the tutorial: a finer measure than accuracy of what a run learnt), seconds."""
    import torch

    preds, labels, loss_sum = [], [], 0.0
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for x, y in dataloader:
            with autocast(precision):
                pred = model(**x).logits
            preds += pred.argmax(1).tolist()
            labels += y.tolist()
            loss_sum += torch.nn.functional.cross_entropy(pred.float(), y, reduction="sum").item()
    return preds, labels, loss_sum / len(labels), time.perf_counter() - start


def tutorial_predict(dataset: AFQMC, model, tokenizer, max_length: int, precision: str) -> float:
    """The tutorial's prediction: one pair at a time (batch of 1). Returns seconds."""
    import torch

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for idx in range(len(dataset)):
            sample = dataset[idx]
            x = tokenizer(sample["sentence1"], sample["sentence2"], truncation=True, max_length=max_length,
                          return_tensors="pt")
            with autocast(precision):
                model(**x).logits.argmax(1).item()
    return time.perf_counter() - start


def worker_tutorial(spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    set_threads(spec["threads"])
    seed_everything(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2)
    max_length, batch_size = spec["max_seq_length"], spec["batch_size"]

    def collate(batch):
        return tutorial_collate(batch, tokenizer, max_length)

    train_loader = DataLoader(AFQMC(spec["train_file"]), batch_size=batch_size, shuffle=True, collate_fn=collate)
    dev_loader = DataLoader(AFQMC(spec["dev_file"]), batch_size=batch_size, shuffle=False, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"])
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=len(train_loader))

    result = tutorial_train_loop(train_loader, model, torch.nn.CrossEntropyLoss(), optimizer, lr_scheduler,
                                 spec["precision"])
    preds, labels, dev_loss, eval_seconds = tutorial_test_loop(dev_loader, model, spec["precision"])
    accuracy, f1 = accuracy_f1(preds, labels)
    result.update(eval_seconds=eval_seconds, eval_samples=len(labels), dev_accuracy=accuracy, dev_f1=f1,
                  dev_loss=dev_loss)
    if spec.get("predict_file"):
        predict_set = AFQMC(spec["predict_file"])
        result.update(predict_seconds=tutorial_predict(predict_set, model, tokenizer, max_length, spec["precision"]),
                      predict_samples=len(predict_set))
    return result


# ================================================================================================ worker: Trainer

def encode_pairs(path: str, tokenizer, max_length: int, with_labels: bool) -> list[dict]:
    """Pre-tokenised pairs (no padding), one dict of lists per pair, as DataCollatorWithPadding expects."""
    rows = read_jsonl(path)
    encoded = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True,
                        max_length=max_length)
    items = [{key: encoded[key][i] for key in encoded} for i in range(len(rows))]
    if with_labels:
        for item, row in zip(items, rows):
            item["labels"] = int(row["label"])
    return items


class CountingCollator:
    """Wraps a collator and counts the real and padded tokens of the batches it makes."""

    def __init__(self, collator):
        self.collator = collator
        self.reset()

    def reset(self) -> None:
        self.real_tokens = self.all_tokens = self.samples = 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.real_tokens += int(mask.sum())
        self.all_tokens += mask.numel()
        self.samples += mask.shape[0]
        return batch


def make_step_clock():
    """A TrainerCallback timing the training steps: from on_train_begin (everything set up) to the last
    on_step_end (after the optimizer and scheduler steps)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        start = end = None
        steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            self.steps += 1

    return StepClock()


def trainer_metrics(eval_pred) -> dict:
    preds = eval_pred.predictions.argmax(-1).tolist()
    accuracy, f1 = accuracy_f1(preds, eval_pred.label_ids.tolist())
    return {"accuracy": accuracy, "f1": f1}


def worker_trainer(spec: dict) -> dict:
    try:
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    except ImportError as e:
        raise RowFailed(f"transformers.Trainer is not importable ({e})") from None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    set_threads(spec["threads"])
    seed_everything(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2)
    max_length = spec["max_seq_length"]
    train_set = encode_pairs(spec["train_file"], tokenizer, max_length, with_labels=True)
    dev_set = encode_pairs(spec["dev_file"], tokenizer, max_length, with_labels=True)
    predict_set = encode_pairs(spec["predict_file"], tokenizer, max_length, with_labels=False)
    collator = CountingCollator(DataCollatorWithPadding(tokenizer))
    clock = make_step_clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec["batch_size"],
            per_device_eval_batch_size=spec["eval_batch_size"] or TRAINER_EVAL_BATCH,
            learning_rate=spec["learning_rate"], num_train_epochs=1, seed=spec["seed"], use_cpu=True,
            bf16=spec["precision"] == "bf16", train_sampling_strategy=spec["sampling"], report_to=[],
            save_strategy="no", eval_strategy="no", logging_steps=10**9, dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                          processing_class=tokenizer, compute_metrics=trainer_metrics, callbacks=[clock])
        trainer.train()
        result = {"train_seconds": clock.end - clock.start, "train_samples": collator.samples,
                  "train_real_tokens": collator.real_tokens, "train_all_tokens": collator.all_tokens,
                  "train_steps": clock.steps, "optimizer": str(args.optim)}
        start = time.perf_counter()
        metrics = trainer.evaluate(dev_set)
        result.update(eval_seconds=time.perf_counter() - start, eval_samples=len(dev_set),
                      dev_accuracy=metrics["eval_accuracy"], dev_f1=metrics["eval_f1"])
        start = time.perf_counter()
        trainer.predict(predict_set)
        result.update(predict_seconds=time.perf_counter() - start, predict_samples=len(predict_set))
    return result


# ================================================================================================ worker: matmul peak

def worker_peak(spec: dict) -> dict:
    """Best dense square matmul rate (GFLOP/s) in fp32 and bf16, after a warm-up.

    Each precision is probed at 256x256 first. bf16 under half of fp32 at that size is emulated (no bf16 units:
    1 GFLOP/s was measured on an AVX2-only CPU, where a 2048 matmul takes 20 s): `bf16_emulated` is set, the
    probe rate is kept as its peak, and the bench skips the bf16 rows.
    """
    import torch

    set_threads(spec["threads"])
    result = {"size": spec["size"], "repeats": spec["repeats"]}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        probe = max(matmul_rates(torch, 256, dtype, 3))
        emulated = name != "fp32" and probe < 0.5 * result["fp32_probe_gflops"]
        rates = [probe] if emulated else matmul_rates(torch, spec["size"], dtype, spec["repeats"])
        result.update({f"{name}_probe_gflops": probe, f"{name}_gflops": max(rates), f"{name}_all_gflops": rates})
    result["bf16_emulated"] = emulated
    return result


def matmul_rates(torch, n: int, dtype, repeats: int) -> list[float]:
    """GFLOP/s of `repeats` timed n x n matmuls (after two untimed ones)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return [2 * n**3 / t / 1e9 for t in times]


WORKERS = {"tutorial": worker_tutorial, "trainer": worker_trainer, "peak": worker_peak}


def run_worker(kind: str, spec_file: str) -> int:
    """Entry point of a child: run one measurement and write its result to spec["result_file"]."""
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        result = WORKERS[kind](spec)
    except RowFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    with open(spec["result_file"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


# ================================================================================================ child processes

@dataclass
class ChildRun:
    """A finished child. A `load_before` above the thread count means other work competed for
    the cores (OpenMP threads then spin-wait: the child slows down many times over while its CPU seconds grow)."""

    returncode: int
    peak_rss_mb: float
    wall_seconds: float
    cpu_seconds: float
    load_before: float
    stdout: Path
    stderr: Path

    def last_error_line(self) -> str:
        lines = [line.strip() for line in self.stderr.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}, no stderr"


def child_env(threads: int, extra: dict | None = None) -> dict:
    """The environment of every child: offline, no W&B, the same thread count."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_child(cmd: list[str], env: dict, log_stem: Path, timeout: float) -> ChildRun:
    """Run `cmd` from the repository root; reap it with os.wait4 to get its own peak RSS."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    stdout, stderr = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    load_before = os.getloadavg()[0]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return ChildRun(proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start,
                    usage.ru_utime + usage.ru_stime, load_before, stdout, stderr)


def run_python_worker(kind: str, spec: dict, log_stem: Path, timeout: float) -> tuple[dict, ChildRun]:
    """Run `python bench/throughput.py --worker KIND` on `spec`; its result dict and the child's record."""
    spec_file, result_file = log_stem.with_suffix(".spec.json"), log_stem.with_suffix(".result.json")
    spec = {**spec, "result_file": str(result_file)}
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2))
    result_file.unlink(missing_ok=True)
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_file)],
                      child_env(spec["threads"]), log_stem, timeout)
    if child.returncode != 0 or not result_file.exists():
        raise RowFailed(child.last_error_line())
    return json.loads(result_file.read_text()), child


# ================================================================================================ the tool

def tool_command(spec: dict, output_dir: Path, extra_flags: list[str]) -> list[str]:
    """`python train.py ...` as a user runs it (from the repository root)."""
    cmd = [sys.executable, "train.py", "--model_checkpoint", spec["model_dir"], "--train_file", spec["train_file"],
           "--dev_file", spec["dev_file"], "--output_dir", str(output_dir), "--do_train",
           "--learning_rate", str(spec["learning_rate"]), "--num_train_epochs", "1",
           "--batch_size", str(spec["batch_size"]), "--seed", str(spec["seed"]),
           "--max_seq_length", str(spec["max_seq_length"]), "--logging_steps", "10"]
    if spec.get("predict_file"):
        cmd += ["--predict_file", spec["predict_file"], "--do_predict"]
    if spec["precision"] == "bf16":
        cmd += ["--mixed_precision", "bf16"]
    if spec.get("eval_batch_size"):
        cmd += ["--eval_batch_size", str(spec["eval_batch_size"])]
    return cmd + extra_flags


def last_value(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def read_tool_outputs(output_dir: Path, want_predict: bool) -> dict:
    """The tool's own numbers from OUTPUT_DIR/results.json and OUTPUT_DIR/metrics.jsonl."""
    results_path, metrics_path = output_dir / "results.json", output_dir / "metrics.jsonl"
    if not results_path.exists():
        raise RowFailed(f"no {results_path.name} in the tool's output folder")
    results = json.loads(results_path.read_text())
    records = read_jsonl(metrics_path) if metrics_path.exists() else []
    out = {"dev_accuracy": results.get("dev_accuracy"), "dev_f1": results.get("dev_f1"),
           "dev_loss": results.get("dev_loss"), "notes": []}
    missing = [key for key in TOOL_TRAIN_KEYS if key not in results]
    if missing:
        out["notes"].append(f"results.json lacks {', '.join(missing)}")
    else:
        out.update(train_seconds=results["train_runtime"], train_samples_per_second=results["train_samples_per_second"],
                   train_tokens_per_second=results["train_tokens_per_second"],
                   train_padding_fraction=results["train_padding_fraction"])
    wanted = [("eval_samples_per_second", "dev/samples_per_second")]
    if want_predict:
        wanted.append(("predict_samples_per_second", "predict/samples_per_second"))
    for name, key in wanted:
        value = last_value(records, key)
        if value is None:
            out["notes"].append(f"metrics.jsonl has no {key}")
        out[name] = value
    # The logging windows after the first one: training speed once start-up (and any compilation) is over.
    for name, key in (("train_steady_samples_per_second", "train/samples_per_second"),
                      ("train_steady_tokens_per_second", "train/tokens_per_second")):
        windows = [r[key] for r in records if key in r]
        out[name] = statistics.median(windows[1:]) if len(windows) > 1 else None
    return out


def run_tool(spec: dict, extra_flags: list[str], log_stem: Path, timeout: float,
             keep_output: bool) -> tuple[dict, ChildRun]:
    """Run the tool once; its numbers (raises RowFailed if it failed or reported no training throughput)."""
    work = Path(tempfile.mkdtemp(prefix="tool-", dir=log_stem.parent))
    output_dir = work / "output"
    # torch.compile: a private compile cache per run (measured as a first run), unless `compile_cache` names a
    # shared one. The tool's tokenised-data cache stays inside the bench cache, not the user's.
    env = child_env(spec["threads"], {"TORCHINDUCTOR_CACHE_DIR": spec.get("compile_cache") or str(work / "inductor"),
                                      "XDG_CACHE_HOME": str(CACHE / "xdg")})
    try:
        child = run_child(tool_command(spec, output_dir, extra_flags), env, log_stem, timeout)
        if child.returncode != 0:
            raise RowFailed(child.last_error_line())
        result = read_tool_outputs(output_dir, want_predict=bool(spec.get("predict_file")))
    finally:
        if not keep_output:
            shutil.rmtree(work, ignore_errors=True)
    if "train_seconds" not in result and spec.get("need_throughput", True):
        raise RowFailed("; ".join(result["notes"]))
    return result, child


# ================================================================================================ setup: data, models

@dataclass(frozen=True)
class Subsets:
    train: Path
    dev: Path
    predict: Path
    counts: dict


def data_source(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    real = SHARED_DATA / "afqmc"
    return real if (real / "train.json").exists() else SAMPLE_DATA


def head_lines(src: Path, dst: Path, limit: int | None) -> int:
    """Copy the first `limit` non-empty lines of `src` (all when None) to `dst`; the number copied."""
    with open(src, encoding="utf-8-sig") as f:
        lines = [line.rstrip("\n") + "\n" for line in f if line.strip()]
    lines = lines if limit is None else lines[:limit]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def write_subsets(source: Path, out_dir: Path, n_train: int | None, n_eval: int | None,
                  n_predict: int | None) -> Subsets:
    """The same first-N subsets for every row: train and dev from train/dev.json, predict from test.json."""
    paths = {"train": out_dir / "train.json", "dev": out_dir / "dev.json", "predict": out_dir / "predict.json"}
    counts = {"train": head_lines(source / "train.json", paths["train"], n_train),
              "dev": head_lines(source / "dev.json", paths["dev"], n_eval),
              "predict": head_lines(source / "test.json", paths["predict"], n_predict)}
    return Subsets(paths["train"], paths["dev"], paths["predict"], counts)


def vocab_file(explicit: str | None) -> Path | None:
    path = Path(explicit) if explicit else SHARED_DATA / "bert-base-chinese-tokenizer" / "vocab.txt"
    return path if path.exists() else None


def build_model(name: str, vocab: Path | None, source: Path) -> Path:
    """The random-init model folder for `name`, built once into bench/.cache/models and reused."""
    from afqmc_dist.tiny_model import build_tiny_bert, vocab_from_files

    out = CACHE / "models" / f"{name}-{'bert-vocab' if vocab else 'char-vocab'}"
    marker = out / ".complete"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    chars = None if vocab else vocab_from_files([str(source / f) for f in ("train.json", "dev.json", "test.json")])
    build_tiny_bert(str(out), vocab=chars, vocab_file=str(vocab) if vocab else None, dropout=0.1, seed=0,
                    **MODEL_SHAPES[name])
    marker.write_text("")
    return out


def model_stats(model_dir: Path, subsets: Subsets, max_length: int) -> dict:
    """Parameter counts, shape, mean real tokens per pair of each split, and FLOPs per real token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" report is expected here
    hf_logging.disable_progress_bar()

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in n)
    config = model.config
    stats = {"parameters": total, "non_embedding_parameters": total - embedding,
             "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
             "heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
             "vocab_size": config.vocab_size}
    for split, path in (("train", subsets.train), ("dev", subsets.dev), ("predict", subsets.predict)):
        rows = read_jsonl(path)
        ids = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True,
                        max_length=max_length)["input_ids"]
        stats[f"{split}_mean_tokens_per_pair"] = sum(map(len, ids)) / len(ids)
    n, layers, hidden = stats["non_embedding_parameters"], stats["layers"], stats["hidden_size"]
    stats["train_flops_per_token"] = 6 * n + 12 * layers * hidden * stats["train_mean_tokens_per_pair"]
    for split in ("dev", "predict"):
        stats[f"{split}_forward_flops_per_token"] = 2 * n + 4 * layers * hidden * stats[f"{split}_mean_tokens_per_pair"]
    return stats


# ================================================================================================ one measurement

def normalise(raw: dict) -> dict:
    """Rates from a worker's counts and seconds (tool results already carry rates)."""
    out = dict(raw)
    if "train_samples_per_second" not in out:
        seconds = raw["train_seconds"]
        out["train_samples_per_second"] = raw["train_samples"] / seconds
        out["train_tokens_per_second"] = raw["train_real_tokens"] / seconds
        out["train_padding_fraction"] = 1 - raw["train_real_tokens"] / raw["train_all_tokens"]
    for phase in ("eval", "predict"):
        if f"{phase}_samples_per_second" not in out and raw.get(f"{phase}_seconds"):
            out[f"{phase}_samples_per_second"] = raw[f"{phase}_samples"] / raw[f"{phase}_seconds"]
    return out


def add_mfu(measure: dict, stats: dict, peak_gflops: float) -> dict:
    """Model FLOP utilisation of train, eval and predict against the row precision's matmul peak."""
    peak = peak_gflops * 1e9
    if measure.get("train_tokens_per_second") is not None:
        measure["train_mfu"] = measure["train_tokens_per_second"] * stats["train_flops_per_token"] / peak
    for phase, split in (("eval", "dev"), ("predict", "predict")):
        rate = measure.get(f"{phase}_samples_per_second")
        if rate is not None:
            tokens = rate * stats[f"{split}_mean_tokens_per_pair"]
            measure[f"{phase}_mfu"] = tokens * stats[f"{split}_forward_flops_per_token"] / peak
    return measure


def measure_row(row: str, spec: dict, settings: argparse.Namespace, log_stem: Path) -> dict:
    """Run one row once; a dict of its numbers plus the child's peak RSS and wall time."""
    if row == "tutorial":
        raw, child = run_python_worker("tutorial", spec, log_stem, settings.timeout)
    elif row.startswith("trainer_"):
        sampling = {"trainer_grouped": "group_by_length", "trainer_random": "random"}[row]
        raw, child = run_python_worker("trainer", {**spec, "sampling": sampling}, log_stem, settings.timeout)
    else:
        flags = shlex.split(settings.tool_fast_flags) if row == "tool_fast" else []
        raw, child = run_tool(spec, flags, log_stem, settings.timeout, settings.keep_tool_outputs)
    measure = normalise(raw)
    measure.update(peak_rss_mb=child.peak_rss_mb, wall_seconds=child.wall_seconds, cpu_seconds=child.cpu_seconds,
                   load_before=child.load_before, log=str(child.stderr))
    return measure


# ================================================================================================ aggregation, report

SUMMARY_KEYS = ("train_samples_per_second", "train_tokens_per_second", "train_padding_fraction",
                "eval_samples_per_second", "predict_samples_per_second", "peak_rss_mb", "train_mfu", "eval_mfu",
                "predict_mfu", "train_seconds", "dev_accuracy", "dev_f1", "wall_seconds",
                "train_steady_samples_per_second", "train_steady_tokens_per_second", "cpu_seconds", "load_before")


def median_of(runs: list[dict]) -> dict:
    out = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def add_ratios(rows: list[dict]) -> None:
    """Each row's samples/s over the tutorial fp32 row's, for train, eval and predict."""
    base = next((r for r in rows if r["row"] == "tutorial" and r["precision"] == "fp32" and r["median"]), None)
    for r in rows:
        r["vs_tutorial_fp32"] = {}
        for phase in ("train", "eval", "predict"):
            key = f"{phase}_samples_per_second"
            mine, ref = (r["median"] or {}).get(key), (base["median"] or {}).get(key) if base else None
            r["vs_tutorial_fp32"][phase] = mine / ref if mine and ref else None


def ceilings(stats: dict, peak_gflops: float, rows: list[dict]) -> dict:
    """Samples/s at 100% of the fp32 matmul peak for train, eval and predict (useful FLOPs only: real tokens), and
    those over the tutorial fp32 row's measured rates: no implementation of the same computation can beat them."""
    peak = peak_gflops * 1e9
    base = next((r["median"] for r in rows if r["row"] == "tutorial" and r["precision"] == "fp32" and r["median"]), {})
    out = {"train": peak / (stats["train_flops_per_token"] * stats["train_mean_tokens_per_pair"])}
    for phase, split in (("eval", "dev"), ("predict", "predict")):
        out[phase] = peak / (stats[f"{split}_forward_flops_per_token"] * stats[f"{split}_mean_tokens_per_pair"])
    for phase in ("train", "eval", "predict"):
        measured = base.get(f"{phase}_samples_per_second")
        out[f"{phase}_vs_tutorial"] = out[phase] / measured if measured else None
    return out


def render_ceilings(limits: dict) -> str:
    parts = [f"{phase} {limits[phase]:.0f} samples/s ({fmt(limits[f'{phase}_vs_tutorial'], '.1f', 'x')} the tutorial's)"
             for phase in ("train", "eval", "predict")]
    return "Ceilings at 100% of the fp32 matmul peak: " + ", ".join(parts) + "."


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_table(name: str, stats: dict, rows: list[dict], repeats: int) -> str:
    title = (f"### {name}: {stats['layers']} layers, hidden {stats['hidden_size']}, "
             f"{stats['non_embedding_parameters'] / 1e6:.1f}M non-embedding parameters "
             f"({stats['parameters'] / 1e6:.1f}M total); medians of {repeats} run(s)")
    columns = ("row", "precision", "train samples/s", "real tokens/s", "padding", "eval samples/s",
               "predict samples/s", "peak MB", "train MFU", "train x", "eval x", "predict x")
    lines = [title, "", "| " + " | ".join(columns) + " |", "|---|---|" + "--:|" * (len(columns) - 2)]
    for r in rows:
        m, ratio = r["median"], r["vs_tutorial_fp32"]
        if not m:
            error = r["error"] if r["error"].startswith("skipped") else f"failed: {r['error']}"
            lines.append(f"| {r['row']} | {r['precision']} | {error} |||||||||| ")
            continue
        cells = [r["row"], r["precision"], fmt(m["train_samples_per_second"]), fmt(m["train_tokens_per_second"], ".0f"),
                 fmt(m["train_padding_fraction"] and 100 * m["train_padding_fraction"], ".1f", "%"),
                 fmt(m["eval_samples_per_second"]), fmt(m["predict_samples_per_second"]), fmt(m["peak_rss_mb"], ".0f"),
                 fmt(m["train_mfu"] and 100 * m["train_mfu"], ".1f", "%"),
                 *(fmt(ratio[p], ".2f", "x") for p in ("train", "eval", "predict"))]
        lines.append("| " + " | ".join(cells) + " |")
        notes = list(r.get("notes") or [])
        steady = m.get("train_steady_samples_per_second")
        if steady and m["train_samples_per_second"] and steady > 1.25 * m["train_samples_per_second"]:
            notes.append(f"train {steady:.1f} samples/s after the first logging window (start-up or compilation "
                         "counted in train_runtime)")
        if notes:
            lines.append(f"| | | note: {'; '.join(sorted(set(notes)))} |||||||||| ")
    return "\n".join(lines)


def machine_info(threads: int) -> dict:
    cpu, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    versions = {}
    for package in ("torch", "transformers", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "load_average": os.getloadavg(),
            "bf16_hardware": sorted(flags & {"avx512_bf16", "amx_bf16"}), "python": platform.python_version(),
            **versions}


def render_header(meta: dict, models: dict) -> str:
    m, peak = meta["machine"], meta["peak"]
    bf16_hw = ", ".join(m["bf16_hardware"]) or "none (bf16 matmuls are emulated)"
    settings = meta["settings"]
    lines = [
        "## Throughput: tutorial loop vs HF Trainer vs this tool",
        "",
        (f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads; "
         f"bf16 hardware: {bf16_hw}; load average at start {m['load_average'][0]:.1f}"),
        (f"- software: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
         f"accelerate {m['accelerate']}"),
        (f"- matmul peak ({peak['size']}x{peak['size']}, best of {peak['repeats']}, before and after the rows): "
         f"fp32 {peak['fp32_gflops']:.1f} GFLOP/s, bf16 {peak['bf16_gflops']:.1f} GFLOP/s"),
        f"- data: {meta['data_source']}; vocab: {meta['vocab'] or 'character vocab of the data'}",
        (f"- settings: lr {settings['learning_rate']}, batch {settings['batch_size']}, max_seq_length "
         f"{settings['max_seq_length']}, 1 epoch, seed {settings['seed']}; tool_fast flags: "
         f"`{settings['tool_fast_flags']}`"),
    ]
    for name, model in models.items():
        c = model["counts"]
        lines.append(f"- {name}: {c['train']} train / {c['dev']} dev / {c['predict']} predict pairs; mean real "
                     f"tokens per training pair {model['stats']['train_mean_tokens_per_pair']:.1f}")
    return "\n".join(lines)


# ================================================================================================ modes

def parse_list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if allowed and s not in allowed]
    if bad or not items:
        raise SystemExit(f"error: {text!r}: expected a comma-separated list of {', '.join(allowed or ())}")
    return items


def parse_sizes(text: str | None, models: list[str], position: int, quick: bool) -> dict[str, int]:
    """Per-model sample counts: "N" for every model, or "small=1600,base=320"; defaults per model."""
    table = QUICK_SIZES if quick else DEFAULT_SIZES
    sizes = {m: table[m][position] for m in models}
    if text:
        if "=" not in text:
            return dict.fromkeys(models, int(text))
        for item in parse_list(text):
            name, value = item.split("=", 1)
            sizes[name.strip()] = int(value)
    return sizes


def measure_peak(settings: argparse.Namespace, run_dir: Path, tag: str) -> dict:
    spec = {"threads": settings.threads, "size": 1024 if settings.quick else 2048,
            "repeats": 3 if settings.quick else 5}
    peak, _ = run_python_worker("peak", spec, run_dir / f"peak-{tag}", settings.timeout)
    log(f"matmul peak ({tag}): fp32 {peak['fp32_gflops']:.1f} GFLOP/s, bf16 {peak['bf16_gflops']:.1f} GFLOP/s")
    return peak


def best_peak(measurements: list[dict]) -> dict:
    """The best of the peak measurements (taken before and after the rows: other work on the machine can only
    lower a measurement), with every measurement kept."""
    best = dict(measurements[0])
    for key in ("fp32_gflops", "bf16_gflops"):
        best[key] = max(m[key] for m in measurements)
    best["measurements"] = measurements
    return best


def common_spec(settings: argparse.Namespace, model_dir: Path, subsets: Subsets, precision: str, seed: int) -> dict:
    # --quick is a smoke test: torch.compile reuses one compile cache across quick runs to stay fast.
    return {"compile_cache": str(CACHE / "inductor-quick") if settings.quick else None,
            "model_dir": str(model_dir), "train_file": str(subsets.train), "dev_file": str(subsets.dev),
            "predict_file": str(subsets.predict), "precision": precision, "seed": seed,
            "learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
            "eval_batch_size": settings.eval_batch_size, "max_seq_length": settings.max_seq_length,
            "threads": settings.threads}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_models(settings: argparse.Namespace, models: list[str], source: Path, vocab: Path | None) -> dict:
    """Per model: its folder (built once), the data subsets of every row, and its FLOPs statistics."""
    sizes = [parse_sizes(text, models, i, settings.quick)
             for i, text in enumerate((settings.train_samples, settings.eval_samples, settings.predict_samples))]
    prepared = {}
    for name in models:
        model_dir = build_model(name, vocab, source)
        subsets = write_subsets(source, CACHE / "data" / name, sizes[0][name], sizes[1][name], sizes[2][name])
        prepared[name] = {"model_dir": str(model_dir), "counts": subsets.counts, "shape": MODEL_SHAPES[name],
                          "stats": model_stats(model_dir, subsets, settings.max_seq_length), "subsets": subsets}
    return prepared


def skipped_precisions(peak: dict) -> dict[str, str]:
    """Precisions not worth measuring on this machine, with the reason shown in the table."""
    if peak["bf16_emulated"]:
        return {"bf16": f"skipped: bf16 is emulated on this CPU (matmul peak measured before the rows: "
                        f"bf16 {peak['bf16_gflops']:.1f} GFLOP/s, fp32 {peak['fp32_gflops']:.1f})"}
    return {}


def run_rows(settings: argparse.Namespace, prepared: dict, precisions: list[str], rows: list[str], repeats: int,
             run_dir: Path, skipped: dict[str, str]) -> dict:
    """Every (model, row, precision) `repeats` times, rows interleaved within a repeat so that slow drifts of the
    machine spread over all rows. Returns {model: {(row, precision): {"runs", "error", "notes"}}}; a row that
    fails is not repeated, a precision in `skipped` is not run."""
    records = {name: {(row, precision): {"runs": [], "error": skipped[precision], "notes": []}
                      for precision in precisions if precision in skipped for row in rows} for name in prepared}
    for repeat in range(1, repeats + 1):
        for name, model in prepared.items():
            for precision in precisions:
                for row in rows:
                    record = records[name].setdefault((row, precision), {"runs": [], "error": None, "notes": []})
                    if record["error"]:
                        continue
                    tag = f"{name}-{precision}-{row}-r{repeat}"
                    spec = common_spec(settings, Path(model["model_dir"]), model["subsets"], precision, settings.seed)
                    try:
                        measure = measure_row(row, spec, settings, run_dir / tag)
                    except RowFailed as e:
                        record["error"] = str(e)
                        log(f"[{tag}] failed: {e}")
                        continue
                    record["notes"] += measure.pop("notes", [])
                    record["runs"].append(measure)
                    log(f"[{tag}] train {fmt(measure.get('train_samples_per_second'))} samples/s, "
                        f"eval {fmt(measure.get('eval_samples_per_second'))}, "
                        f"predict {fmt(measure.get('predict_samples_per_second'))}, "
                        f"peak {measure['peak_rss_mb']:.0f} MB, wall {measure['wall_seconds']:.0f}s, "
                        f"load before {measure['load_before']:.1f}")
    return records


def run_throughput(settings: argparse.Namespace) -> int:
    models = parse_list(settings.models or ("small" if settings.quick else "small,base"), tuple(MODEL_SHAPES))
    precisions = parse_list(settings.precisions, PRECISIONS)
    rows = parse_list(settings.rows, ROWS)
    repeats = 1 if settings.quick and settings.repeats is None else settings.repeats or 3
    source, vocab = data_source(settings.data_dir), vocab_file(settings.vocab_file)
    run_dir = CACHE / "runs" / time.strftime("%Y%m%d-%H%M%S")
    log(f"logs: {run_dir}")

    machine = machine_info(settings.threads)
    first_peak = measure_peak(settings, run_dir, "start")
    prepared = prepare_models(settings, models, source, vocab)
    records = run_rows(settings, prepared, precisions, rows, repeats, run_dir, skipped_precisions(first_peak))
    peak = best_peak([first_peak, measure_peak(settings, run_dir, "end")])

    meta = {"machine": machine, "peak": peak, "data_source": str(source), "vocab": str(vocab) if vocab else None,
            "settings": {k: v for k, v in vars(settings).items() if k not in ("worker", "spec")}}
    meta["settings"].update(models=models, precisions=precisions, rows=rows, repeats=repeats)
    print(render_header(meta, prepared) + "\n")
    output = {"meta": meta, "models": {}}
    for name, model in prepared.items():
        table_rows = []
        for (row, precision), rec in records[name].items():
            for measure in rec["runs"]:
                add_mfu(measure, model["stats"], peak[f"{precision}_gflops"])
            table_rows.append({"row": row, "precision": precision, "error": rec["error"], "notes": rec["notes"],
                               "median": median_of(rec["runs"]) if rec["runs"] else None, "runs": rec["runs"]})
        add_ratios(table_rows)
        limits = ceilings(model["stats"], peak["fp32_gflops"], table_rows)
        print(render_table(name, model["stats"], table_rows, repeats) + "\n")
        print(render_ceilings(limits) + "\n")
        output["models"][name] = {**{k: v for k, v in model.items() if k != "subsets"}, "rows": table_rows,
                                  "ceilings": limits}
    print("MFU: real tokens/s x (6N + 12LHS) / matmul peak of the row's precision; x: samples/s over the tutorial "
          "fp32 row's. Trainer rows evaluate and predict in length-grouped order with group_by_length.\n")
    write_output(settings.output or str(CACHE / "throughput-quick.json" if settings.quick
                                        else BENCH / "results" / "throughput.json"), output)
    return 0


def accuracy_run(row: str, spec: dict, settings: argparse.Namespace, log_stem: Path) -> dict:
    """Train one row once (no prediction); its dev accuracy and F1."""
    try:
        if row == "tutorial":
            raw, child = run_python_worker("tutorial", spec, log_stem, settings.timeout)
        else:
            raw, child = run_tool({**spec, "need_throughput": False}, [], log_stem, settings.timeout,
                                  settings.keep_tool_outputs)
    except RowFailed as e:
        return {"row": row, "seed": spec["seed"], "error": str(e)}
    return {"row": row, "seed": spec["seed"], "dev_accuracy": raw["dev_accuracy"], "dev_f1": raw["dev_f1"],
            "dev_loss": raw.get("dev_loss"), "train_seconds": raw.get("train_seconds"),
            "wall_seconds": child.wall_seconds}


def render_accuracy(results: list[dict], rows: tuple[str, ...]) -> str:
    lines = ["| row | seed | dev accuracy | dev F1 (label 1) | dev loss | train s | wall s |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['seed']} | failed: {r['error']} ||||| ")
        else:
            lines.append(f"| {r['row']} | {r['seed']} | {r['dev_accuracy']:.4f} | {r['dev_f1']:.4f} | "
                         f"{fmt(r.get('dev_loss'), '.4f')} | {fmt(r['train_seconds'], '.0f')} | "
                         f"{r['wall_seconds']:.0f} |")
    for row in rows:
        done = [r for r in results if r["row"] == row and "error" not in r]
        if done:
            losses = [r["dev_loss"] for r in done if r.get("dev_loss") is not None]
            lines.append(f"| {row} | mean | {statistics.mean(r['dev_accuracy'] for r in done):.4f} | "
                         f"{statistics.mean(r['dev_f1'] for r in done):.4f} | "
                         f"{fmt(statistics.mean(losses) if losses else None, '.4f')} | | |")
    return "\n".join(lines)


def run_accuracy(settings: argparse.Namespace) -> int:
    """Dev accuracy and F1 of the tutorial loop and of the tool's defaults, small model, one epoch per seed."""
    rows = ("tutorial", "tool_default")
    source, vocab = data_source(settings.data_dir), vocab_file(settings.vocab_file)
    n_train = settings.accuracy_train_samples or (64 if settings.quick else None)
    n_eval = settings.accuracy_eval_samples or (64 if settings.quick else None)
    model_dir = build_model("small", vocab, source)
    subsets = write_subsets(source, CACHE / "data" / "accuracy", n_train, n_eval, 1)
    run_dir = CACHE / "runs" / f"accuracy-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"logs: {run_dir}; {subsets.counts['train']} train / {subsets.counts['dev']} dev pairs from {source}")
    meta = {"machine": machine_info(settings.threads), "data_source": str(source), "counts": subsets.counts,
            "model_dir": str(model_dir), "shape": MODEL_SHAPES["small"],
            "settings": {k: v for k, v in vars(settings).items() if k not in ("worker", "spec")}}
    output = settings.accuracy_output or str(CACHE / "accuracy-quick.json" if settings.quick
                                             else BENCH / "results" / "accuracy.json")
    results = []
    for seed in (int(s) for s in parse_list(settings.seeds)):
        spec = {**common_spec(settings, model_dir, subsets, "fp32", seed), "predict_file": None,
                "learning_rate": settings.accuracy_learning_rate}
        for row in rows:
            results.append(accuracy_run(row, spec, settings, run_dir / f"accuracy-{row}-seed{seed}"))
            log(f"[{row} seed {seed}] {results[-1]}")
            write_output(output, {"meta": meta, "results": results})  # after every run: hours of work are kept

    print(f"## Dev accuracy after one epoch: small model, {subsets.counts['train']} train / {subsets.counts['dev']} "
          f"dev pairs ({source}), lr {settings.accuracy_learning_rate}, batch {settings.batch_size}\n")
    print(render_accuracy(results, rows))
    return 0


def write_output(path: str, obj: dict) -> None:
    """Write the results as JSON, paths relative to the project root (`bench/...`, `../shared/...`), so a committed
    file reads the same on every machine."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    text = text.replace(f'"{REPO}/', '"').replace(f'"{REPO.parent}/', '"../')
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n", encoding="utf-8")
    log(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated: small, base (default: both; small with --quick)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--repeats", type=int, help="runs per row; the table shows medians (default 3; 1 with --quick)")
    p.add_argument("--train_samples", help='training pairs: "N" or per model (default "small=1600,base=400")')
    p.add_argument("--eval_samples", help='dev pairs: "N" or per model (default "small=1000,base=300")')
    p.add_argument("--predict_samples", help='pairs to predict: "N" or per model (default "small=300,base=100")')
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_batch_size", type=int,
                   help=f"eval/predict batch of the Trainer and the tool (default: Trainer {TRAINER_EVAL_BATCH}, "
                        "the tool its own default); the tutorial evaluates at the training batch size")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every row (all cores)")
    p.add_argument("--tool_fast_flags", default="--length_group_size 1000 --eval_batch_size 32",
                   help="extra train.py flags of the tool_fast row")
    p.add_argument("--data_dir", help="folder with train/dev/test.json (default: ../shared/data/afqmc if present, "
                                      "else afqmc_dist/sample_data)")
    p.add_argument("--vocab_file", help="WordPiece vocab of the models (default: ../shared/data/"
                                        "bert-base-chinese-tokenizer/vocab.txt if present, else the data's characters)")
    p.add_argument("--output", help="JSON of every number (default bench/results/throughput.json)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a row's process is killed")
    p.add_argument("--keep_tool_outputs", action="store_true", help="keep the tool's output folders under the logs")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run in under 2 minutes")
    g = p.add_argument_group("accuracy check")
    g.add_argument("--accuracy", action="store_true", help="run the accuracy check instead of the throughput bench")
    g.add_argument("--seeds", default="1,2")
    g.add_argument("--accuracy_train_samples", type=int, help="default: the whole training file (one epoch)")
    g.add_argument("--accuracy_eval_samples", type=int, help="default: the whole dev file")
    g.add_argument("--accuracy_learning_rate", type=float, default=5e-5)
    g.add_argument("--accuracy_output", help="default bench/results/accuracy.json")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder
    if settings.worker:
        return run_worker(settings.worker, settings.spec)
    sys.path.insert(0, str(REPO))  # afqmc_dist, when run as `python bench/throughput.py`
    return run_accuracy(settings) if settings.accuracy else run_throughput(settings)


if __name__ == "__main__":
    sys.exit(main())
