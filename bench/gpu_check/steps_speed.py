"""The speed steps of `bench/gpu_check.sh` (one GPU): torch.compile against eager, and the throughput bench.

Both measure rather than judge: they fail only when something does not run or a number is impossible (a row
off the GPU, an MFU above 100%), and report the numbers for a person to read.
"""

from __future__ import annotations

import statistics
import sys

from bench.gpu_check.checking import Check, Failed, Steps
from bench.gpu_check.limits import BASIS, CPU
from bench.gpu_check.steps_one_device import (
    CHECKPOINT_EVERY,
    SAMPLE,
    one_process,
    read_json,
    run_args,
    steps_per_epoch,
    verify_run,
)

steps = Steps()
BENCH_ROWS = ("tutorial", "trainer_grouped", "tool_default")


def steady_rate(metrics: list[dict]) -> float | None:
    """Median training samples/s of the logging windows after the first (start-up and first compilation over)."""
    windows = [r["train/samples_per_second"] for r in metrics if "train/samples_per_second" in r]
    return statistics.median(windows[1:]) if len(windows) > 1 else None


@steps.add("torch_compile_bf16", "gpu",
           "--torch_compile in bf16 (train/test/predict): recompilations counted, samples/s against train_bf16 (eager)",
           part=1, cpu_seconds=CPU["torch_compile_bf16"], basis=BASIS["torch_compile_bf16"], compiles=True)
def torch_compile_bf16(check: Check) -> dict:
    from bench.common import read_jsonl

    eager = check.earlier("train_bf16", "run as the eager baseline")
    out = check.work / "compile_bf16"
    args = run_args(check, out, 2, "--checkpointing_steps", CHECKPOINT_EVERY, "--mixed_precision", "bf16",
                    "--torch_compile")
    # TORCH_LOGS=recompiles: dynamo logs every recompilation with the guard that failed; a fresh inductor cache,
    # so the compile time is that of a first run.
    done = check.command(one_process(check, args), env={"TORCH_LOGS": "recompiles",
                                                        "TORCHINDUCTOR_CACHE_DIR": str(check.work / "inductor-new")})
    check.expect(done, 0, "train + test + predict with --torch_compile")
    verify_run(check, out, done.output, 2 * steps_per_epoch())
    compiled, baseline = read_json(out / "results.json"), read_json(eager / "results.json")
    steady = {name: steady_rate(read_jsonl(folder / "metrics.jsonl")) for name, folder in
              (("compiled", out), ("eager", eager))}
    reasons = [line.strip()[:200] for line in done.output.splitlines() if "triggered by" in line or
               "guard failure" in line.lower()]
    numbers = {"recompiles": done.output.count("Recompiling function"), "recompile_reasons": reasons[:5],
               "compiled_samples_per_second": compiled.get("train_samples_per_second"),
               "eager_samples_per_second": baseline.get("train_samples_per_second"),
               "compiled_steady_samples_per_second": steady["compiled"],
               "eager_steady_samples_per_second": steady["eager"]}
    if numbers["compiled_samples_per_second"] and numbers["eager_samples_per_second"]:
        numbers["speedup_whole_run"] = numbers["compiled_samples_per_second"] / numbers["eager_samples_per_second"]
    if steady["compiled"] and steady["eager"]:
        numbers["speedup_after_first_window"] = steady["compiled"] / steady["eager"]
    return numbers


@steps.add("bench_bert_base_bf16", "gpu",
           "bench/throughput.py, bert-base shape, bf16: tutorial loop vs Trainer vs tool (samples/s, MFU, GPU memory)",
           part=2, cpu_seconds=CPU["bench_bert_base_bf16"], basis=BASIS["bench_bert_base_bf16"], processes=5)
def bench_bert_base_bf16(check: Check) -> dict:
    result_file = check.work / "bench.json"
    # The 240 sample pairs repeated to 1024: enough steps to measure, few enough for the check's time budget.
    done = check.command([sys.executable, "bench/throughput.py", "--device", "cuda", "--models", "base",
                          "--precisions", "bf16", "--rows", ",".join(BENCH_ROWS), "--repeats", "1",
                          "--train_samples", "1024", "--eval_samples", "128", "--predict_samples", "64",
                          "--data_dir", SAMPLE, "--vocab_file", "none", "--cache_dir", check.work / "bench-cache",
                          "--output", result_file, "--timeout", "150"])
    check.expect(done, 0, "bench/throughput.py")
    result = read_json(result_file)
    peak = result["meta"]["peak"]
    numbers = {"device": result["meta"]["device"], "peak_tflops": {"fp32": peak["fp32_gflops"] / 1e3,
                                                                   "bf16": peak["bf16_gflops"] / 1e3}, "rows": {}}
    problems = []
    for row in result["models"]["base"]["rows"]:
        median = row["median"] or {}
        numbers["rows"][row["row"]] = {
            "device": row["device"], "error": row["error"],
            **{key: median.get(key) for key in ("train_samples_per_second", "eval_samples_per_second",
                                                "predict_samples_per_second", "train_mfu", "gpu_peak_memory_mb",
                                                "train_padding_fraction")}}
        mfu, memory = median.get("train_mfu"), median.get("gpu_peak_memory_mb")
        if row["error"]:
            problems.append(f"{row['row']}: {row['error']}")
        elif not row["device"].startswith("cuda"):
            problems.append(f"{row['row']} ran on {row['device']}")
        elif not (mfu and 0 < mfu <= 1) or not (memory and memory > 0):
            problems.append(f"{row['row']}: train MFU {mfu}, GPU memory {memory} MB")
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers
