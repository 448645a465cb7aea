"""Training speed of every encoder family at one tiny shape, beside BERT's: a slowdown of one family shows.

    python -m bench.families                  # -> a table, and bench/results/families.json
    python -m bench.families --families bert,deberta-v2 --train_samples 960

Each family gets the same shape (hidden 64, 2 layers, 2 heads: afqmc_dist.tiny_model with a tokenizer of its kind
trained on the data) and the same run of the tool, in a child process of its own (children.py, tool_loop.py): one
epoch of the sample data repeated to --train_samples pairs (4800), batch 16, on the CPU in fp32. The rates are the
tool's own (results.json: training samples/s and tokens/s over its training steps); `vs bert` is per token:
each tokenizer cuts a pair into its own number of tokens (those trained here on the sample data: about 20
for WordPiece, 14 for Unigram, 5-6 for byte-level BPE, which merges frequent character pairs). Timings mean
something only with nothing else running: the 1-minute load is recorded with each row.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

from bench.common import BENCH, measured, parse_list, write_output
from bench.tool_loop import run_tool_on_cpu
from bench.workload import sample_workload

SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}


def measure(family: str, data, work: Path, args) -> dict:
    from afqmc_dist.tiny_model import build_tiny_model

    model = work / f"model-{family}"
    build_tiny_model(str(model), family, [str(data.train), str(data.dev)], dropout=0.1, **SHAPE)
    result, load = run_tool_on_cpu(model, data, work, family, [], threads=args.threads, learning_rate=1e-3,
                                   batch_size=16, max_seq_length=128)
    return {"family": family, "train_samples_per_second": result.get("train_samples_per_second"),
            "train_steady_samples_per_second": result.get("train_steady_samples_per_second"),
            "train_tokens_per_second": result.get("train_tokens_per_second"),
            "train_padding_fraction": result.get("train_padding_fraction"), "load_before": load}


def main(argv: list[str] | None = None) -> int:
    from afqmc_dist.architectures import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--train_samples", type=int, default=4800)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default=str(BENCH / "results" / "families.json"))
    args = parser.parse_args(argv)
    families = parse_list(args.families, tuple(FAMILIES))
    with sample_workload("families-", args.train_samples) as (work, data):
        rows = [measured(family, partial(measure, family, data, work, args), {"family": family})
                for family in families]
    # Per token, not per pair: each family's tokenizer cuts a pair into its own number of tokens.
    bert = next((r.get("train_tokens_per_second") for r in rows if r["family"] == "bert"), None)
    print(f"{'family':<15} {'samples/s':>10} {'tokens/pair':>11} {'tokens/s':>9} {'vs bert':>8} {'padding':>8} "
          f"{'load':>5}")
    for row in rows:
        if "error" in row:
            print(f"{row['family']:<15} error: {row['error']}")
            continue
        rate, tokens = row["train_samples_per_second"], row["train_tokens_per_second"]
        row["tokens_per_pair"] = tokens / rate
        row["vs_bert"] = tokens / bert if bert else None
        print(f"{row['family']:<15} {rate:>10.1f} {row['tokens_per_pair']:>11.1f} {tokens:>9.0f} "
              f"{row['vs_bert'] or 0:>7.2f}x {100 * row['train_padding_fraction']:>7.1f}% {row['load_before']:>5.2f}")
    write_output(args.output, {"shape": SHAPE, "train_samples": args.train_samples, "threads": args.threads,
                               "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
