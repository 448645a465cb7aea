"""Time per optimizer step with each training recipe, against plain training (training/recipes.py).

    python -m bench.recipes                     # -> a table, and bench/results/recipes.json
    python -m bench.recipes --rows plain,fgm --train_samples 960

Every row is the same run of the tool (children.py, tool_loop.py) with one recipe on: a small random BERT (hidden
256, 4 layers, 4 heads; the data's characters as vocabulary), one epoch of the sample data repeated to
--train_samples pairs, batch 16, on the CPU in fp32. Time per step is the tool's own measure: the steady
throughput (the logging windows after the first) turned into seconds per global batch. The last column is the
ratio to the plain row. Timings mean something only with nothing else running: the 1-minute load is recorded
with each row.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

from bench.common import BENCH, SAMPLE_DATA, measured, parse_list, write_output
from bench.tool_loop import run_tool_on_cpu
from bench.workload import build_model, sample_workload

BATCH = 16
ROWS = {
    "plain": [],
    "class_weights": ["--class_weights", "auto"],
    "label_smoothing": ["--label_smoothing", "0.1"],
    "layerwise_lr_decay": ["--layerwise_lr_decay", "0.9"],
    "ema": ["--ema_decay", "0.999"],
    "fgm": ["--adversarial", "fgm"],
    "rdrop": ["--rdrop_alpha", "1"],
    "clue_recipe": ["--layerwise_lr_decay", "0.95", "--ema_decay", "0.999", "--adversarial", "fgm"],
}


def measure(row: str, model: Path, data, work: Path, threads: int) -> dict:
    result, load = run_tool_on_cpu(model, data, work, row, ["--logging_steps", "5", *ROWS[row]], threads=threads,
                                   learning_rate=1e-4, batch_size=BATCH, max_seq_length=64)
    rate = result.get("train_steady_samples_per_second") or result["train_samples_per_second"]
    return {"row": row, "flags": " ".join(ROWS[row]), "samples_per_second": rate,
            "seconds_per_step": BATCH / rate, "load_before": load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--train_samples", type=int, default=960)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default=str(BENCH / "results" / "recipes.json"))
    args = parser.parse_args(argv)
    rows = parse_list(args.rows, tuple(ROWS))
    with sample_workload("recipes-", args.train_samples) as (work, data):
        model = build_model("small", None, SAMPLE_DATA, work)
        results = [measured(row, partial(measure, row, model, data, work, args.threads),
                            {"row": row, "flags": " ".join(ROWS[row])}) for row in rows]
    plain = next((r["seconds_per_step"] for r in results if r["row"] == "plain" and "error" not in r), None)
    print(f"{'recipe':<19} {'flags':<62} {'s/step':>7} {'vs plain':>8} {'load':>5}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:<19} {r['flags']:<62} error: {r['error']}")
            continue
        r["vs_plain"] = r["seconds_per_step"] / plain if plain else None
        ratio = f"{r['vs_plain']:.2f}x" if r["vs_plain"] else "-"
        print(f"{r['row']:<19} {r['flags']:<62} {r['seconds_per_step']:>7.3f} {ratio:>8} {r['load_before']:>5.2f}")
    write_output(args.output, {"batch_size": BATCH, "train_samples": args.train_samples, "threads": args.threads,
                               "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
