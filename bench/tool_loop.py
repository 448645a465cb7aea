"""The tool rows: this project's `train.py ... --do_train --do_predict`, exactly as a user runs it.

tool_default   default flags (bf16: --mixed_precision bf16);
tool_fast      the same plus --tool_fast_flags (default: the whole epoch in one length-sorted group, eval batches of
               32, the fastest eval batch measured on a 2-core CPU).

The tool runs in a child process (`worker_tool`) that calls `afqmc_dist.cli.main(argv)`, which is all `train.py`
does, so that the child can also read `torch.cuda.max_memory_allocated` at the end. On a CPU the row passes
`--cpu`; on a GPU the tool takes cuda:0 itself, and fp32 rows pass `--no_tf32` (strict fp32, as every other
fp32 row and the fp32 peak). Its numbers are the tool's own, read from OUTPUT_DIR/results.json (training: the
interval of the training steps, `train_runtime`) and OUTPUT_DIR/metrics.jsonl (eval, predict, and the training
speed after the first logging window, i.e. once start-up and any compilation are over).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.children import run_python_worker
from bench.common import RowFailed, read_jsonl
from bench.measure import Memory, row_record

TOOL_TRAIN_KEYS = ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_padding_fraction")


def tool_argv(spec: dict, output_dir: Path, extra_flags: list[str]) -> list[str]:
    """The arguments of `python train.py` for this row."""
    argv = ["--model_checkpoint", spec["model_dir"], "--train_file", spec["train_file"],
            "--dev_file", spec["dev_file"], "--output_dir", str(output_dir), "--do_train",
            "--learning_rate", str(spec["learning_rate"]), "--num_train_epochs", "1",
            "--batch_size", str(spec["batch_size"]), "--seed", str(spec["seed"]),
            "--max_seq_length", str(spec["max_seq_length"]), "--logging_steps", "10"]
    if spec.get("predict_file"):
        argv += ["--predict_file", spec["predict_file"], "--do_predict"]
    if spec["device"] == "cpu":
        argv.append("--cpu")
    if spec["precision"] == "bf16":
        argv += ["--mixed_precision", "bf16"]
    elif spec["device"] == "cuda":
        argv.append("--no_tf32")
    if spec.get("eval_batch_size"):
        argv += ["--eval_batch_size", str(spec["eval_batch_size"])]
    return argv + extra_flags


def worker_tool(spec: dict) -> dict:
    """Child process: run the tool in-process on spec["argv"]; its exit status (its own error line, if any, is on
    stderr) and where it ran."""
    from afqmc_dist.cli import main

    memory = Memory(spec["device"]).start()
    status = main(spec["argv"])
    return {"exit_status": status, **row_record(spec["device"], memory)}


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


def run_tool(spec: dict, extra_flags: list[str], log_stem: Path, timeout: float, keep_output: bool,
             cache: Path) -> tuple[dict, object]:
    """Run the tool once in a child; its numbers and the child's record (RowFailed if it failed or reported no
    training throughput)."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tool-", dir=log_stem.parent))
    output_dir = work / "output"
    # torch.compile: a private compile cache per run (measured as a first run), unless `compile_cache` names a
    # shared one. The tool's tokenised-data cache stays inside the bench cache, not the user's.
    env = {"TORCHINDUCTOR_CACHE_DIR": spec.get("compile_cache") or str(work / "inductor"),
           "XDG_CACHE_HOME": str(cache / "xdg")}
    try:
        worker_spec = {**spec, "argv": tool_argv(spec, output_dir, extra_flags)}
        raw, child = run_python_worker("tool", worker_spec, log_stem, timeout, env)
        if raw["exit_status"] != 0:
            raise RowFailed(f"{child.last_error_line()} (exit status {raw['exit_status']})")
        result = {**raw, **read_tool_outputs(output_dir, want_predict=bool(spec.get("predict_file")))}
    finally:
        if not keep_output:
            shutil.rmtree(work, ignore_errors=True)
    if "train_seconds" not in result and spec.get("need_throughput", True):
        raise RowFailed("; ".join(result["notes"]))
    return result, child


def run_tool_on_cpu(model: Path, data, work: Path, log_name: str, flags: list[str], *, threads: int,
                    learning_rate: float, batch_size: int, max_seq_length: int) -> tuple[dict, float]:
    """One training run of the tool on the CPU in fp32 (seed 1, no tokenised-data cache) for a small bench:
    its numbers and the 1-minute load before it (timings mean something only with nothing else running)."""
    spec = {"model_dir": str(model), "train_file": str(data.train), "dev_file": str(data.dev),
            "learning_rate": learning_rate, "batch_size": batch_size, "seed": 1, "max_seq_length": max_seq_length,
            "device": "cpu", "precision": "fp32", "threads": threads}
    load = os.getloadavg()[0]
    result, _ = run_tool(spec, ["--cache_dir", "none", *flags], work / "logs" / log_name, timeout=900,
                         keep_output=False, cache=work)
    return result, round(load, 2)
