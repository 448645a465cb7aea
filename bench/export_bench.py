"""Prediction speed on this CPU: the torch model against its ONNX Runtime exports (fp32 and int8), side by side.

    python -m bench.export_bench                       # small and bert-base shapes, 512 dev pairs, 3 rounds
    python -m bench.export_bench --shapes base --pairs 1024 --rounds 5

For each model shape (bench/workload.py: small = hidden 256 x 4 layers, base = bert-base, hidden 768 x 12 layers;
random weights, bert-base-chinese's vocabulary from ../shared when present) a classifier folder is saved as a run's
best/ would be, then exported with `python -m afqmc_dist.export` twice, fp32 and `--quantize int8` (gate opened
with --max_accuracy_drop 1: the bench reports the drop, it does not refuse it). The three models then predict the
same dev pairs (AFQMC's dev.json from ../shared when present, else the sample set), tokenised and batched as the
export's check does (longest first, batch 64), in --rounds interleaved rounds; the table shows each one's best
round. Accuracy is against the file's labels (random weights: near the majority guess, the point is the change),
agreement and the largest probability difference against torch fp32.

Timings mean something on an idle machine only (other work slows torch's threads most, several times over): before
timing, the bench waits (up to --wait_minutes) for the 1-minute load average to fall below --max_load, and every
timed pass is checked for other processes' CPU time during it (/proc/stat against this process's own): a pass in
which they took more than --max_others of a core is thrown away and run again once the machine is idle. The table
says the load before and after, and the most CPU other processes took during a kept pass.
Results: a markdown table on stdout (docs/export.md shows one), every number in CACHE/export/results.json (--output
to change). --reuse keeps the exports of an earlier run (same cache) instead of exporting again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` and `afqmc_dist`, when run as a script

from bench.common import DEFAULT_CACHE, log, parse_list, write_output
from bench.workload import MODEL_SHAPES, build_model, data_source, head_lines, vocab_file

RUNTIMES = ("torch fp32", "onnxruntime fp32", "onnxruntime int8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=lambda s: parse_list(s, tuple(MODEL_SHAPES)), default=["small", "base"])
    parser.add_argument("--pairs", type=int, default=512, help="dev pairs predicted per round (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, runtimes interleaved (default 3)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_load", type=float, default=0.7, help="1-minute load average to wait for")
    parser.add_argument("--wait_minutes", type=float, default=20, help="how long to wait for it (then time anyway, "
                        "saying so)")
    parser.add_argument("--max_others", type=float, default=0.1, help="CPU time of other processes allowed during "
                        "a timed pass, in cores (default 0.1)")
    parser.add_argument("--reuse", action="store_true", help="reuse the exports of an earlier run")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--output", help="where the JSON results go (default CACHE/export/results.json)")
    return parser.parse_args(argv)


def classifier_folder(shape: str, cache: Path, source: Path, vocab: Path | None) -> Path:
    """A best/-style folder: the shape's random encoder plus a seeded classification head, saved whole."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from afqmc_dist.loading import quiet_transformers

    encoder = build_model(shape, vocab, source, cache)
    out = cache / "models" / f"{encoder.name}-classifier"
    if (out / ".complete").exists():
        return out
    torch.manual_seed(0)
    with quiet_transformers():  # the new head is the point, not news
        model = AutoModelForSequenceClassification.from_pretrained(encoder, id2label={0: "0", 1: "1"},
                                                                   label2id={"0": 0, "1": 1})
        model.save_pretrained(out)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(out)
    (out / ".complete").write_text("")
    return out


def export(model: Path, check_file: Path, out: Path, quantize: bool, max_seq_length: int, reuse: bool) -> Path:
    """`python -m afqmc_dist.export` in this process; the export folder (an earlier one is replaced, or with
    `reuse` kept)."""
    from afqmc_dist.export.__main__ import main
    from afqmc_dist.export.runtime import is_exported

    if reuse and is_exported(out):
        return out
    args = ["--model", str(model), "--output_dir", str(out), "--check_file", str(check_file),
            "--max_seq_length", str(max_seq_length)] + (["--quantize", "int8", "--max_accuracy_drop", "1"]
                                                       if quantize else [])
    started = time.perf_counter()
    if main(args) != 0:
        raise SystemExit(f"error: exporting {model} failed (see the line above)")
    log(f"exported {model.name} ({'int8' if quantize else 'fp32'}) in {time.perf_counter() - started:.0f} s")
    return out


def wait_for_idle(max_load: float, minutes: float) -> float:
    """Sleep until the 1-minute load average is below `max_load` (at most `minutes`); return the load then."""
    deadline = time.monotonic() + 60 * minutes
    load = os.getloadavg()[0]
    while load >= max_load and time.monotonic() < deadline:
        log(f"load average {load:.2f} >= {max_load}: waiting for an idle machine")
        time.sleep(30)
        load = os.getloadavg()[0]
    if load >= max_load:
        log(f"warning: load average still {load:.2f} after {minutes:g} minutes: timing anyway (numbers will be low)")
    return load


def callers(model_dir: Path, exports: dict[str, Path]) -> dict:
    """Each runtime as `batch -> logits`, the torch one with the inputs its graph takes."""
    from afqmc_dist.export.check import exported_caller, torch_caller
    from afqmc_dist.export.graph import input_names
    from afqmc_dist.export.runtime import load_exported
    from afqmc_dist.model import load_trained_model

    model, _ = load_trained_model(str(model_dir))
    result = {RUNTIMES[0]: torch_caller(model, input_names(model))}
    for name, folder in zip(RUNTIMES[1:], (exports["fp32"], exports["int8"])):
        result[name] = exported_caller(load_exported(str(folder), prefer_cuda=False)[0])
    return result


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of the whole machine, of this process) so far: the difference is what other processes used."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def clean_run(call, check, settings: argparse.Namespace):
    """One timed pass during which other processes took at most --max_others of a core (retried after waiting
    for an idle machine otherwise, 5 times at most); (run, others' CPU in cores)."""
    from afqmc_dist.export.check import run_model

    for _ in range(5):
        machine, own = cpu_seconds()
        run = run_model(call, check)
        machine_after, own_after = cpu_seconds()
        others = max(0.0, (machine_after - machine) - (own_after - own)) / run.seconds
        if others <= settings.max_others:
            return run, others
        log(f"other processes took {others:.2f} cores during the pass: again once the machine is idle")
        wait_for_idle(settings.max_load, settings.wait_minutes)
    return run, others


def measure(runs: dict, check, settings: argparse.Namespace) -> tuple[dict[str, dict], float]:
    """Every runtime over the check set, interleaved, --rounds times: the best pass of each compared with torch's,
    and the most CPU other processes took during a kept pass."""
    from afqmc_dist.export.check import compare

    best, worst_others = {}, 0.0
    for _ in range(settings.rounds):
        for name, call in runs.items():
            run, others = clean_run(call, check, settings)
            worst_others = max(worst_others, others)
            if name not in best or run.seconds < best[name].seconds:
                best[name] = run
    reference = best[RUNTIMES[0]]
    return {name: compare(reference, run, check) for name, run in best.items()}, worst_others


def bench_shape(shape: str, settings: argparse.Namespace, check_file: Path, source: Path) -> dict:
    from transformers import AutoTokenizer

    from afqmc_dist.export.check import read_check_set
    from afqmc_dist.pairs import PairSchema

    model_dir = classifier_folder(shape, settings.cache, source, vocab_file(None))
    exports = {precision: export(model_dir, check_file, settings.cache / "exports" / f"{model_dir.name}-{precision}",
                                 precision == "int8", settings.max_seq_length, settings.reuse)
               for precision in ("fp32", "int8")}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check = read_check_set(str(check_file), PairSchema(), tokenizer, settings.max_seq_length, settings.batch_size)
    runs = callers(model_dir, exports)
    load_before = wait_for_idle(settings.max_load, settings.wait_minutes)
    results, others = measure(runs, check, settings)
    return {"shape": shape, "model": str(model_dir), "config": MODEL_SHAPES[shape], "load_before": load_before,
            "load_after": os.getloadavg()[0], "others_cpu_cores": others, "results": results}


def table(rows: list[dict]) -> str:
    header = ("| shape | runtime | pairs/s | x torch fp32 | accuracy | agreement with torch | max prob diff "
              "| load before / after, others' CPU |")
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        torch_speed = row["results"][RUNTIMES[0]]["pairs_per_second_exported"]
        for name, result in row["results"].items():
            speed = result["pairs_per_second_exported"]
            lines.append(f"| {row['shape']} | {name} | {speed:.0f} | {speed / torch_speed:.2f} | "
                         f"{result['accuracy_exported']:.4f} | {result['label_agreement']:.4f} | "
                         f"{result['max_prob_diff']:.1e} | {row['load_before']:.2f} / {row['load_after']:.2f}, "
                         f"{row['others_cpu_cores']:.2f} cores |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = data_source(None)
    check_file = settings.cache / "export" / "dev.json"
    count, repeats = head_lines(source / "dev.json", check_file, settings.pairs)
    log(f"{count} dev pairs of {source} ({repeats} repeated)")
    rows = [bench_shape(shape, settings, check_file, source) for shape in settings.shapes]
    import torch

    results = {"pairs": count, "pairs_repeated": repeats, "data": str(source), "batch_size": settings.batch_size,
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "rows": rows}
    write_output(settings.output or str(settings.cache / "export" / "results.json"), results)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
