"""Predicting large files: peak memory and pairs/s of the streaming path (inference/) beside the in-memory path it
replaced, side by side in one run, at 10^5 and 10^6 pairs; and the rate of each stage of the streaming path.

    python -m bench.predict_scale                                # -> a table, and bench/results/predict_scale.json
    python -m bench.predict_scale --sizes 100000 --rows streaming,in_memory

Input: AFQMC's pairs (../shared/data/afqmc when present, else the sample set) repeated to N lines, each with a
unique id, so that CLUE's file is written too. Model: a small random BERT (hidden 64, 2 layers) fine-tuned by the
tool for a few steps, so that the file's reading, checking, tokenising and writing weigh as much as they can
against the model: the hardest case for the streaming path's overhead (with bert-base the model's time dwarfs
it). Everything on the CPU, in fp32.

Rows, each one command in a child process of its own, measured from outside (peak RSS: the largest VmHWM among
the command's processes, polled from /proc; wait4's ru_maxrss would not do, it keeps the peak of the bench process
that forked the child, from before the child's exec):
    streaming      python -m afqmc_dist.predict (this version), one process
    streaming_2p   the same under python -m afqmc_dist.launcher with 2 processes (at the smallest size only)
    in_memory      the same command of the version before streaming (git commit IN_MEMORY_COMMIT, exported with
                   `git archive` into the work folder): every pair read, tokenised and predicted in memory,
                   written at the end
pairs/s is N over the command's wall time (start-up, checks, model load and writing included), and `tool` is
the rate the command itself reports for its prediction loop. Stage rates (one process, in this process, on the
smallest size): the first pass (scan.py: reading and checking every line), tokenising alone (PairEncoder, a piece
at a time) and the model alone (on the tokenised batches).

Timings mean something only with nothing else running: the 1-minute load is recorded with each row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from bench.common import (
    BENCH,
    REPO,
    SAMPLE_DATA,
    SHARED_DATA,
    RowFailed,
    log,
    measured,
    parse_list,
    read_jsonl,
    write_output,
)

IN_MEMORY_COMMIT = "69476ed"  # the last version whose predict read the whole file into memory
ROWS = ("streaming", "streaming_2p", "in_memory")
SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}
BATCH = 64


def source_pairs() -> list[dict]:
    folder = SHARED_DATA / "afqmc" if (SHARED_DATA / "afqmc" / "train.json").exists() else SAMPLE_DATA
    return [{k: record[k] for k in ("sentence1", "sentence2")}
            for name in ("train.json", "dev.json") for record in read_jsonl(folder / name)]


def write_input(path: Path, count: int, pairs: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": f"p{i}", **pairs[i % len(pairs)]}, ensure_ascii=False) + "\n"
                     for i in range(count))
    return path


def train_model(work: Path) -> Path:
    """A small BERT fine-tuned by the tool for a few steps (predict refuses a model without a trained head)."""
    from afqmc_dist.tiny_model import build_tiny_model

    base = work / "base"
    build_tiny_model(str(base), "bert", [str(SAMPLE_DATA / "train.json"), str(SAMPLE_DATA / "dev.json")], **SHAPE)
    out = work / "trained"
    data = {"train_file": SAMPLE_DATA / "train.json", "dev_file": SAMPLE_DATA / "dev.json"}
    command = [sys.executable, "train.py", "--model_checkpoint", str(base), "--output_dir", str(out), "--do_train",
               "--max_steps", "4", "--batch_size", "16", "--cpu", "--cache_dir", "none",
               *(item for key, path in data.items() for item in (f"--{key}", str(path)))]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ,
                            "WANDB_MODE": "disabled"})
    if result.returncode != 0:
        raise SystemExit(f"error: training the bench model failed: {result.stderr.strip().splitlines()[-1]}")
    return out / "best"


def export_in_memory_version(work: Path) -> Path:
    """The package as it was at IN_MEMORY_COMMIT, in work/in_memory/ (run with PYTHONPATH there)."""
    folder = work / "in_memory"
    folder.mkdir()
    try:
        archive = subprocess.run(["git", "archive", IN_MEMORY_COMMIT, "afqmc_dist"], cwd=REPO, capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RowFailed(f"needs the project's git history ({IN_MEMORY_COMMIT}): {e}") from None
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def command_of(row: str, model: Path, source: Path, output: Path, work: Path) -> tuple[list[str], dict]:
    flags = ["--model", str(model), "--input", str(source), "--output", str(output), "--batch_size", str(BATCH)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    if row == "streaming":
        return [sys.executable, "-m", "afqmc_dist.predict", *flags, "--cpu"], env
    if row == "streaming_2p":
        threads = max(1, (os.cpu_count() or 2) // 2)
        return [sys.executable, "-m", "afqmc_dist.launcher", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                "afqmc_dist.predict", *flags], {**env, "OMP_NUM_THREADS": str(threads)}
    return [sys.executable, "-m", "afqmc_dist.predict", *flags, "--cpu"], {**env, "PYTHONPATH": str(work / "in_memory")}


def measure(row: str, model: Path, source: Path, count: int, work: Path) -> dict:
    output = work / f"{row}-{count}" / "preds.jsonl"
    command, env = command_of(row, model, source, output, work)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(work / f"{row}-{count}.log", "w") as log_file:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
        done, peak = threading.Event(), [0]
        sampler = threading.Thread(target=poll_peak_rss, args=(process.pid, done, peak))
        sampler.start()
        stdout = process.stdout.read()
        status = process.wait()
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if status != 0:
        tail = (work / f"{row}-{count}.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise RowFailed(f"exit {status}: {' '.join(tail)}")
    reported = re.search(r"\((\d+) pairs/s", stdout)
    with open(output, encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    if lines != count:
        raise RowFailed(f"{lines} lines written for {count} pairs")
    return {"row": row, "pairs": count, "seconds": round(seconds, 1), "pairs_per_second": count / seconds,
            "tool_pairs_per_second": int(reported.group(1)) if reported else None,
            "peak_rss_mb": peak[0] / 1024, "load_before": round(load, 2)}


def poll_peak_rss(root: int, done: threading.Event, peak: list[int], every: float = 0.1) -> None:
    """Keep in peak[0] the largest VmHWM (kB: the kernel's high-water mark of a process's resident memory) among
    `root` and its descendants, polled every `every` seconds until `done`."""
    while not done.wait(every):
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        tree, frontier = {root}, [root]
        while frontier:
            children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
            tree.update(children)
            frontier = children
        for pid in tree:
            with contextlib.suppress(OSError, StopIteration, ValueError), open(f"/proc/{pid}/status") as f:
                line = next(line for line in f if line.startswith("VmHWM:"))  # none once a zombie
                peak[0] = max(peak[0], int(line.split()[1]))


def stage_rates(model_dir: Path, source: Path, count: int) -> dict:
    """Pairs/s of each stage of the streaming path alone, one process, on the CPU."""
    import torch

    from afqmc_dist.inference.engine import PairEncoder
    from afqmc_dist.inference.scan import read_piece, scan
    from afqmc_dist.model import load_trained_model
    from afqmc_dist.pairs import PairSchema

    schema = PairSchema()
    started = time.perf_counter()
    index = scan(str(source), schema, require_label=False, piece_size=10_000)
    scan_rate = count / (time.perf_counter() - started)
    model, tokenizer = load_trained_model(str(model_dir))
    model.eval()
    encoder = PairEncoder(tokenizer, 128, None, token_types=True)
    pieces = [read_piece(index, piece, schema, False) for piece in range(index.pieces)]
    pieces = [sorted(examples, key=lambda e: -(len(e.sentence1) + len(e.sentence2))) for examples in pieces]
    started = time.perf_counter()
    batches = [batch for examples in pieces for batch in encoder.batches(examples, BATCH)]
    tokenise_rate = count / (time.perf_counter() - started)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    model_rate = count / (time.perf_counter() - started)
    return {"pairs": count, "scan_pairs_per_second": scan_rate, "tokenise_pairs_per_second": tokenise_rate,
            "model_pairs_per_second": model_rate, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated pair counts")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--output", default=str(BENCH / "results" / "predict_scale.json"))
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in parse_list(args.sizes))
    rows_wanted = parse_list(args.rows, ROWS)
    results, pairs = [], source_pairs()
    with tempfile.TemporaryDirectory(prefix="predict-scale-") as folder:
        work = Path(folder)
        model = train_model(work)
        in_memory_error = None
        if "in_memory" in rows_wanted:
            try:
                export_in_memory_version(work)
            except RowFailed as e:
                in_memory_error = str(e)
        for count in sizes:
            source = write_input(work / f"pairs-{count}.jsonl", count, pairs)
            for row in rows_wanted:
                if row == "streaming_2p" and count != sizes[0]:
                    continue
                if row == "in_memory" and in_memory_error:
                    results.append({"row": row, "pairs": count, "error": in_memory_error})
                    continue
                results.append(measured(f"{row} at {count} pairs", partial(measure, row, model, source, count, work),
                                        {"row": row, "pairs": count}))
            if count == sizes[0]:
                log("stage rates ...")
                stages = stage_rates(model, source, count)
            source.unlink()
    print(f"{'row':<13} {'pairs':>9} {'seconds':>8} {'pairs/s':>8} {'tool':>7} {'vs in-mem':>9} {'peak RSS':>9} "
          f"{'load':>5}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:<13} {r['pairs']:>9} error: {r['error']}")
            continue
        base = next((b for b in results if b["row"] == "in_memory" and b["pairs"] == r["pairs"] and "error" not in b),
                    None)
        r["vs_in_memory"] = r["pairs_per_second"] / base["pairs_per_second"] if base else None
        ratio = f"{r['vs_in_memory']:.2f}x" if r["vs_in_memory"] else "-"
        print(f"{r['row']:<13} {r['pairs']:>9} {r['seconds']:>8.1f} {r['pairs_per_second']:>8.0f} "
              f"{r['tool_pairs_per_second'] or 0:>7} {ratio:>9} {r['peak_rss_mb']:>7.0f}MB {r['load_before']:>5.2f}")
    print(f"\nstages at {stages['pairs']} pairs, one process, {stages['threads']} threads: first pass (scan) "
          f"{stages['scan_pairs_per_second']:.0f} pairs/s, tokenising alone {stages['tokenise_pairs_per_second']:.0f}"
          f" pairs/s, model alone {stages['model_pairs_per_second']:.0f} pairs/s")
    write_output(args.output, {"shape": SHAPE, "batch_size": BATCH, "in_memory_commit": IN_MEMORY_COMMIT,
                               "cpus": os.cpu_count(), "rows": results, "stages": stages})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
