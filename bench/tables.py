"""From runs to tables: medians over repeats, ratios to the tutorial row, markdown for the README."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
from pathlib import Path

SUMMARY_KEYS = ("train_samples_per_second", "train_tokens_per_second", "train_padding_fraction",
                "eval_samples_per_second", "predict_samples_per_second", "peak_memory_mb", "peak_rss_mb",
                "gpu_peak_memory_mb", "train_mfu", "eval_mfu", "predict_mfu", "train_seconds", "dev_accuracy",
                "dev_f1", "wall_seconds", "train_steady_samples_per_second", "train_steady_tokens_per_second",
                "cpu_seconds", "load_before")
PHASES = ("train", "eval", "predict")


def median_of(runs: list[dict]) -> dict:
    out = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def tutorial_median(rows: list[dict], precision: str) -> dict | None:
    return next((r["median"] for r in rows if r["row"] == "tutorial" and r["precision"] == precision and r["median"]),
                None)


def add_ratios(rows: list[dict]) -> None:
    """Each row's samples/s over the tutorial row's, for train, eval and predict: `vs_tutorial` against the
    tutorial in the same precision (the table's "x" columns), `vs_tutorial_fp32` against the fp32 tutorial."""
    for r in rows:
        for key, precision in (("vs_tutorial", r["precision"]), ("vs_tutorial_fp32", "fp32")):
            base = tutorial_median(rows, precision) or {}
            r[key] = {}
            for phase in PHASES:
                name = f"{phase}_samples_per_second"
                mine, ref = (r["median"] or {}).get(name), base.get(name)
                r[key][phase] = mine / ref if mine and ref else None


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_ceilings(limits: dict) -> str:
    """One line per precision: the samples/s a run would reach at 100% of that precision's matmul peak."""
    lines = []
    for precision, limit in limits.items():
        parts = [f"{phase} {limit[phase]:.0f} samples/s ({fmt(limit[f'{phase}_vs_tutorial'], '.1f', 'x')} the "
                 f"tutorial's)" for phase in PHASES]
        lines.append(f"Ceilings at 100% of the {precision} matmul peak: " + ", ".join(parts) + ".")
    return "\n".join(lines)


def render_table(name: str, stats: dict, rows: list[dict], repeats: int) -> str:
    title = (f"### {name}: {stats['layers']} layers, hidden {stats['hidden_size']}, "
             f"{stats['non_embedding_parameters'] / 1e6:.1f}M non-embedding parameters "
             f"({stats['parameters'] / 1e6:.1f}M total); medians of {repeats} run(s)")
    columns = ("row", "precision", "device", "train samples/s", "real tokens/s", "padding", "eval samples/s",
               "predict samples/s", "peak MB", "train MFU", "train x", "eval x", "predict x")
    empty = "|" * (len(columns) - 3)
    lines = [title, "", "| " + " | ".join(columns) + " |", "|---|---|---|" + "--:|" * (len(columns) - 3)]
    for r in rows:
        m, ratio = r["median"], r["vs_tutorial"]
        if not m:
            error = r["error"] if r["error"].startswith("skipped") else f"failed: {r['error']}"
            lines.append(f"| {r['row']} | {r['precision']} | {r.get('device') or '-'} | {error} {empty}")
            continue
        cells = [r["row"], r["precision"], r["device"], fmt(m["train_samples_per_second"]),
                 fmt(m["train_tokens_per_second"], ".0f"),
                 fmt(m["train_padding_fraction"] and 100 * m["train_padding_fraction"], ".1f", "%"),
                 fmt(m["eval_samples_per_second"]), fmt(m["predict_samples_per_second"]),
                 fmt(m["peak_memory_mb"], ".0f"), fmt(m["train_mfu"] and 100 * m["train_mfu"], ".1f", "%"),
                 *(fmt(ratio[p], ".2f", "x") for p in PHASES)]
        lines.append("| " + " | ".join(cells) + " |")
        notes = list(r.get("notes") or [])
        steady = m.get("train_steady_samples_per_second")
        if steady and m["train_samples_per_second"] and steady > 1.25 * m["train_samples_per_second"]:
            notes.append(f"train {steady:.1f} samples/s after the first logging window (start-up or compilation "
                         "counted in train_runtime)")
        if notes:
            lines.append(f"| | | | note: {'; '.join(sorted(set(notes)))} {empty}")
    return "\n".join(lines)


def machine_info(threads: int, device: str) -> dict:
    """CPU, thread count, load, software versions, and the device the rows run on ('cuda': the GPU's name comes
    from the peak measurement, so that this process never creates a CUDA context)."""
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
            "device": device, **versions}


def render_header(meta: dict, models: dict) -> str:
    m, peak, settings = meta["machine"], meta["peak"], meta["settings"]
    if m["device"] == "cuda":
        where = f"device: {peak['device']}; host {m['cpu']}, {m['threads']} threads"
        memory = "peak MB: torch.cuda.max_memory_allocated of the row's process"
    else:
        bf16_hw = ", ".join(m["bf16_hardware"]) or "none (bf16 matmuls are emulated)"
        where = (f"device: cpu, {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads; "
                 f"bf16 hardware: {bf16_hw}")
        memory = "peak MB: peak RSS of the row's process"
    lines = [
        "## Throughput: tutorial loop vs HF Trainer vs this tool",
        "",
        f"- {where}; load average at start {m['load_average'][0]:.1f}",
        (f"- software: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
         f"accelerate {m['accelerate']}"),
        (f"- matmul peak ({peak['size']}x{peak['size']}, {peak['timer']}, best of {peak['repeats']} x "
         f"{len(peak['measurements'])} measurement(s)): fp32 {peak['fp32_gflops']:.1f} GFLOP/s, "
         f"bf16 {peak['bf16_gflops']:.1f} GFLOP/s; {memory}"),
        f"- data: {meta['data_source']}; vocab: {meta['vocab'] or 'character vocab of the data'}",
        (f"- settings: lr {settings['learning_rate']}, batch {settings['batch_size']}, max_seq_length "
         f"{settings['max_seq_length']}, 1 epoch, seed {settings['seed']}; tool_fast flags: "
         f"`{settings['tool_fast_flags']}`"),
    ]
    for name, model in models.items():
        c = model["counts"]
        repeats = sum(v for k, v in c.items() if k.endswith("_repeated"))
        lines.append(f"- {name}: {c['train']} train / {c['dev']} dev / {c['predict']} predict pairs"
                     f"{f' ({repeats} of them repeats of the file)' if repeats else ''}; mean real tokens per "
                     f"training pair {model['stats']['train_mean_tokens_per_pair']:.1f}")
    return "\n".join(lines)


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
