"""`python bench/throughput.py --accuracy`: does the tool's speed cost accuracy?

The small model on real AFQMC (a full training epoch unless --accuracy_train_samples), the full dev set, lr 5e-5
by default (a random-init model barely moves at 1e-5), batch 16, for each of --seeds: the tutorial loop vs the
tool's defaults, same seed, learning rate and initial weights; prints dev accuracy, F1 of label "1" and dev loss.
Results go to bench/results/accuracy.json, rewritten after every run (hours of work are kept).
"""

from __future__ import annotations

import argparse
import time

from bench.children import run_python_worker
from bench.common import BENCH, RowFailed, log, parse_list, write_output
from bench.tables import machine_info, render_accuracy
from bench.tool_loop import run_tool
from bench.workload import MODEL_SHAPES, build_model, common_spec, data_source, vocab_file, write_subsets

ROWS = ("tutorial", "tool_default")


def accuracy_run(row: str, spec: dict, settings: argparse.Namespace, log_stem) -> dict:
    """Train one row once (no prediction); its dev accuracy and F1."""
    try:
        if row == "tutorial":
            raw, child = run_python_worker("tutorial", spec, log_stem, settings.timeout)
        else:
            raw, child = run_tool({**spec, "need_throughput": False}, [], log_stem, settings.timeout,
                                  settings.keep_tool_outputs, settings.cache)
    except RowFailed as e:
        return {"row": row, "seed": spec["seed"], "error": str(e)}
    return {"row": row, "seed": spec["seed"], "dev_accuracy": raw["dev_accuracy"], "dev_f1": raw["dev_f1"],
            "dev_loss": raw.get("dev_loss"), "train_seconds": raw.get("train_seconds"),
            "wall_seconds": child.wall_seconds, "device": raw.get("device")}


def run_accuracy(settings: argparse.Namespace) -> int:
    source, vocab = data_source(settings.data_dir), vocab_file(settings.vocab_file)
    n_train = settings.accuracy_train_samples or (64 if settings.quick else None)
    n_eval = settings.accuracy_eval_samples or (64 if settings.quick else None)
    model_dir = build_model("small", vocab, source, settings.cache)
    subsets = write_subsets(source, settings.cache / "data" / "accuracy", n_train, n_eval, 1, repeat=False)
    run_dir = settings.cache / "runs" / f"accuracy-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"logs: {run_dir}; {subsets.counts['train']} train / {subsets.counts['dev']} dev pairs from {source}")
    meta = {"machine": machine_info(settings.threads, settings.device), "data_source": str(source),
            "counts": subsets.counts, "model_dir": str(model_dir), "shape": MODEL_SHAPES["small"],
            "settings": {k: v for k, v in vars(settings).items() if k != "cache"}}
    output = settings.accuracy_output or str(settings.cache / "accuracy-quick.json" if settings.quick
                                             else BENCH / "results" / "accuracy.json")
    results = []
    for seed in (int(s) for s in parse_list(settings.seeds)):
        spec = {**common_spec(settings, model_dir, subsets, "fp32", seed), "predict_file": None,
                "learning_rate": settings.accuracy_learning_rate}
        for row in ROWS:
            results.append(accuracy_run(row, spec, settings, run_dir / f"accuracy-{row}-seed{seed}"))
            log(f"[{row} seed {seed}] {results[-1]}")
            write_output(output, {"meta": meta, "results": results})

    print(f"## Dev accuracy after one epoch: small model, {subsets.counts['train']} train / {subsets.counts['dev']} "
          f"dev pairs ({source}), lr {settings.accuracy_learning_rate}, batch {settings.batch_size}\n")
    print(render_accuracy(results, ROWS))
    return 0
