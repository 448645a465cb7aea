"""Training, evaluation and prediction throughput on AFQMC: this tool vs the tutorial loop vs the HF Trainer.

Reproduce, from the repository root (the bench sets HF_HUB_OFFLINE=1 and WANDB_MODE=disabled for its children):

    python bench/throughput.py --quick                        # smoke run of every row, < 3 minutes on a CPU
    python bench/throughput.py                                # small and base, fp32 and bf16, 3 repeats
    python bench/throughput.py --models small --repeats 5     # small model only
    python bench/throughput.py --models base --precisions bf16 --train_samples 2000   # a GPU, bert-base shape
    python bench/throughput.py --accuracy --seeds 1,2 --accuracy_learning_rate 5e-4   # one AFQMC epoch per seed

Every row runs on the same device: the GPU when there is one (`--device cpu` to stay on the CPU), else the CPU.

Results: a markdown table per model on stdout; every raw number in bench/results/throughput.json
(bench/results/accuracy.json for --accuracy; --quick writes under the cache folder instead, --output anywhere).
Progress goes to stderr; each child's stdout/stderr, spec and result are kept under CACHE/runs/.

Rows (each in its own module; every run of a row is a separate child process, see children.py): the same data
subsets (workload.py), model folder, seed, thread count and device; learning rate 1e-5, batch 16,
max_seq_length 128, one epoch. Every row trains `AutoModelForSequenceClassification` (BERT + pooler + dropout +
linear), so that the FLOPs are the same in every row.

    tutorial          tutorial_loop.py: the well-known AFQMC tutorial's loop, re-implemented as written
    trainer_grouped   trainer_loop.py: transformers.Trainer with length-grouped batches
    trainer_random    the same with random batches (the Trainer's default)
    tool_default      tool_loop.py: `train.py ... --do_train --do_predict` with default flags
    tool_fast         the same plus --tool_fast_flags

bf16 rows run only where bf16 is real: when the measured bf16 matmul peak is under half the fp32 peak (no bf16
units: bf16 is emulated), they are reported as skipped with both peaks, not run for hours. fp32 rows are strict
fp32 on a GPU (TF32 off in every row).

Columns: training samples/s, real (non-padding) tokens/s and the padding fraction of the training batches,
eval and predict samples/s, peak memory of the row's process (torch.cuda.max_memory_allocated on a GPU, peak RSS
on a CPU), model FLOP utilisation (MFU) of training, and each row's samples/s over the tutorial row's of the same
precision. How time, memory, the matmul peak and MFU are measured: measure.py. Under each table, the ceilings:
the samples/s a run would reach at 100% of the peak, and what that is against the tutorial's own rates.

Timing excludes start-up (imports, model loading, pre-tokenisation, optimizer creation): for tutorial and
Trainer rows the clock starts once everything is set up and stops after the last optimizer step; the tool reports
the same interval itself (`train_runtime`). Every row runs --repeats times, rows interleaved within each repeat;
the table shows medians, the JSON keeps every run with the load average before it and the child's CPU seconds.
Other work on the machine slows a row many times over: run the bench on an idle machine.

--accuracy (accuracy.py): the small model on real AFQMC, the tutorial loop vs the tool's defaults, dev accuracy
and F1 of label "1" after one epoch per seed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` and `afqmc_dist`, when run as a script

from bench.children import run_python_worker
from bench.common import BENCH, DEFAULT_CACHE, RowFailed, log, parse_list, write_output
from bench.measure import add_mfu, best_peak, ceilings, model_stats, normalise, resolve_device
from bench.tables import add_ratios, fmt, machine_info, median_of, render_ceilings, render_header, render_table
from bench.tool_loop import run_tool
from bench.workload import MODEL_SHAPES, build_model, common_spec, data_source, vocab_file, write_subsets

# (train, eval, predict) pairs per model: about a minute per training row on a 2-core CPU.
DEFAULT_SIZES = {"small": (1600, 1000, 300), "base": (400, 300, 100)}
QUICK_SIZES = {"small": (48, 32, 8), "base": (16, 16, 4)}
ROWS = ("tutorial", "trainer_grouped", "trainer_random", "tool_default", "tool_fast")
PRECISIONS = ("fp32", "bf16")
TRAINER_SAMPLING = {"trainer_grouped": "group_by_length", "trainer_random": "random"}




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
    gpu = settings.device == "cuda"
    size = (4096 if settings.quick else 8192) if gpu else (1024 if settings.quick else 2048)
    spec = {"threads": settings.threads, "device": settings.device, "size": size,
            "repeats": 3 if settings.quick else 5}
    peak, _ = run_python_worker("peak", spec, run_dir / f"peak-{tag}", settings.timeout)
    log(f"matmul peak ({tag}, {peak['device']}): fp32 {peak['fp32_gflops']:.1f} GFLOP/s, "
        f"bf16 {peak['bf16_gflops']:.1f} GFLOP/s")
    return peak


def measure_row(row: str, spec: dict, settings: argparse.Namespace, log_stem: Path) -> dict:
    """Run one row once; a dict of its numbers plus the child's peak memory and wall time."""
    if row == "tutorial":
        raw, child = run_python_worker("tutorial", spec, log_stem, settings.timeout)
    elif row in TRAINER_SAMPLING:
        raw, child = run_python_worker("trainer", {**spec, "sampling": TRAINER_SAMPLING[row]}, log_stem,
                                       settings.timeout)
    else:
        flags = shlex.split(settings.tool_fast_flags) if row == "tool_fast" else []
        raw, child = run_tool(spec, flags, log_stem, settings.timeout, settings.keep_tool_outputs, settings.cache)
    measure = normalise(raw)
    gpu_memory = measure.get("gpu_peak_memory_mb")
    measure.update(peak_rss_mb=child.peak_rss_mb, wall_seconds=child.wall_seconds, cpu_seconds=child.cpu_seconds,
                   load_before=child.load_before, log=str(child.stderr),
                   peak_memory_mb=gpu_memory if gpu_memory is not None else child.peak_rss_mb)
    return measure


def prepare_models(settings: argparse.Namespace, models: list[str], source: Path, vocab: Path | None) -> dict:
    """Per model: its folder (built once), the data subsets of every row, and its FLOPs statistics."""
    sizes = [parse_sizes(text, models, i, settings.quick)
             for i, text in enumerate((settings.train_samples, settings.eval_samples, settings.predict_samples))]
    prepared = {}
    for name in models:
        model_dir = build_model(name, vocab, source, settings.cache)
        subsets = write_subsets(source, settings.cache / "data" / name, sizes[0][name], sizes[1][name],
                                sizes[2][name])
        prepared[name] = {"model_dir": str(model_dir), "counts": subsets.counts, "shape": MODEL_SHAPES[name],
                          "stats": model_stats(model_dir, subsets.splits(), settings.max_seq_length),
                          "subsets": subsets}
    return prepared


def skipped_precisions(peak: dict) -> dict[str, str]:
    """Precisions not worth measuring on this machine, with the reason shown in the table."""
    if peak["bf16_emulated"]:
        return {"bf16": f"skipped: bf16 is emulated on this {peak['device']} (matmul peak measured before the rows: "
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
                    log(f"[{tag}] {measure['device']}: train {fmt(measure.get('train_samples_per_second'))} "
                        f"samples/s, eval {fmt(measure.get('eval_samples_per_second'))}, "
                        f"predict {fmt(measure.get('predict_samples_per_second'))}, "
                        f"peak {measure['peak_memory_mb']:.0f} MB, wall {measure['wall_seconds']:.0f}s, "
                        f"load before {measure['load_before']:.1f}")
    return records


def run_throughput(settings: argparse.Namespace) -> int:
    models = parse_list(settings.models or ("small" if settings.quick else "small,base"), tuple(MODEL_SHAPES))
    precisions = parse_list(settings.precisions, PRECISIONS)
    rows = parse_list(settings.rows, ROWS)
    repeats = 1 if settings.quick and settings.repeats is None else settings.repeats or 3
    source, vocab = data_source(settings.data_dir), vocab_file(settings.vocab_file)
    run_dir = settings.cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    log(f"logs: {run_dir}; rows on {settings.device}")

    machine = machine_info(settings.threads, settings.device)
    first_peak = measure_peak(settings, run_dir, "start")
    prepared = prepare_models(settings, models, source, vocab)
    records = run_rows(settings, prepared, precisions, rows, repeats, run_dir, skipped_precisions(first_peak))
    # The peak again after the rows (the best is kept: other work can only lower it); not worth it for a smoke run.
    peak = best_peak([first_peak] + ([] if settings.quick else [measure_peak(settings, run_dir, "end")]))

    meta = {"machine": machine, "device": peak["device"], "peak": peak, "data_source": str(source),
            "vocab": str(vocab) if vocab else None,
            "settings": {k: v for k, v in vars(settings).items() if k != "cache"}}
    meta["settings"].update(models=models, precisions=precisions, rows=rows, repeats=repeats)
    print(render_header(meta, prepared) + "\n")
    output = {"meta": meta, "models": {}}
    for name, model in prepared.items():
        table_rows = []
        for (row, precision), rec in records[name].items():
            for measure in rec["runs"]:
                add_mfu(measure, model["stats"], peak[f"{precision}_gflops"])
            device = rec["runs"][0]["device"] if rec["runs"] else peak["device"]
            table_rows.append({"row": row, "precision": precision, "device": device, "error": rec["error"],
                               "notes": rec["notes"], "median": median_of(rec["runs"]) if rec["runs"] else None,
                               "runs": rec["runs"]})
        add_ratios(table_rows)
        limits = {precision: ceilings(model["stats"], peak[f"{precision}_gflops"],
                                      next((r["median"] for r in table_rows if r["row"] == "tutorial"
                                            and r["precision"] == precision and r["median"]), None))
                  for precision in precisions if precision not in skipped_precisions(first_peak)}
        print(render_table(name, model["stats"], table_rows, repeats) + "\n")
        print(render_ceilings(limits) + "\n")
        output["models"][name] = {**{k: v for k, v in model.items() if k != "subsets"}, "rows": table_rows,
                                  "ceilings": limits.get("fp32") or next(iter(limits.values()), None),
                                  "ceilings_by_precision": limits}
    print("MFU: real tokens/s x (6N + 12LHS) / matmul peak of the row's precision on its device; x: samples/s over "
          "the tutorial row's of the same precision. Trainer rows evaluate and predict in length-grouped order "
          "with group_by_length.\n")
    write_output(settings.output or str(settings.cache / "throughput-quick.json" if settings.quick
                                        else BENCH / "results" / "throughput.json"), output)
    return 0




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated: small, base (default: both; small with --quick)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where every row runs (default: the GPU when there is one, else the CPU)")
    p.add_argument("--repeats", type=int, help="runs per row; the table shows medians (default 3; 1 with --quick)")
    p.add_argument("--train_samples", help='training pairs: "N" or per model (default "small=1600,base=400")')
    p.add_argument("--eval_samples", help='dev pairs: "N" or per model (default "small=1000,base=300")')
    p.add_argument("--predict_samples", help='pairs to predict: "N" or per model (default "small=300,base=100")')
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_batch_size", type=int,
                   help="eval/predict batch of the Trainer and the tool (default: Trainer 64, the tool its own "
                        "default); the tutorial evaluates at the training batch size")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every row (all cores)")
    p.add_argument("--tool_fast_flags", default="--length_group_size 1000 --eval_batch_size 32",
                   help="extra train.py flags of the tool_fast row")
    p.add_argument("--data_dir", help="folder with train/dev/test.json (default: ../shared/data/afqmc if present, "
                                      "else afqmc_dist/sample_data)")
    p.add_argument("--vocab_file", help="WordPiece vocab of the models (default: ../shared/data/"
                                        "bert-base-chinese-tokenizer/vocab.txt if present, else the data's "
                                        "characters; 'none': the data's characters)")
    p.add_argument("--output", help="JSON of every number (default bench/results/throughput.json)")
    p.add_argument("--cache_dir", default=str(DEFAULT_CACHE),
                   help="models, data subsets and the logs of every child (default bench/.cache)")
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
    settings = p.parse_args(argv)
    settings.cache = Path(settings.cache_dir).resolve()
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is a local folder
    settings.device = resolve_device(settings.device)
    if settings.accuracy:
        from bench.accuracy import run_accuracy

        return run_accuracy(settings)
    return run_throughput(settings)


if __name__ == "__main__":
    sys.exit(main())
