"""bench/throughput.py: every loop under comparison runs and is measured on the row's device, and the arithmetic
behind the numbers (matmul peak, FLOPs, MFU, ceilings) holds.

The bench is run for correctness only, on tiny sizes: its timings mean nothing here (see the README's Performance
section for how to measure). On a GPU machine the smoke run's rows run on the GPU; the CUDA-only measuring code
has its own `gpu` tests.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLE_DIR, limit

from afqmc_dist.tiny_model import build_tiny_bert
from bench.measure import (
    Memory,
    add_mfu,
    best_peak,
    bf16_is_emulated,
    ceilings,
    cuda_matmul_rates,
    model_stats,
    worker_peak,
)
from bench.trainer_loop import sampling_arguments
from bench.workload import head_lines

ROWS = ("tutorial", "trainer_grouped", "tool_default")  # one row of each loop: tutorial, Trainer, this tool
EXPECTED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    """One quick bench run: a row of each loop, fp32, the small model, a few pairs of the sample data."""
    tmp = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "bench/throughput.py", "--quick", "--rows", ",".join(ROWS), "--precisions", "fp32",
         "--train_samples", "32", "--eval_samples", "16", "--predict_samples", "4", "--data_dir", str(SAMPLE_DIR),
         "--vocab_file", "none", "--cache_dir", str(tmp / "cache"), "--output", str(tmp / "throughput.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=limit(300))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp / "throughput.json").read_text()), result


def test_the_quick_bench_measures_a_row_of_each_loop_on_the_machines_device(smoke):
    output, _ = smoke
    rows = {r["row"]: r for r in output["models"]["small"]["rows"]}
    assert set(rows) == set(ROWS)
    assert output["meta"]["device"].split()[0] == EXPECTED_DEVICE
    for name, row in rows.items():
        assert row["error"] is None, name
        assert row["device"].split()[0] == EXPECTED_DEVICE, name
        (run,) = row["runs"]
        assert run["device"] == row["device"]
        for phase in ("train", "eval", "predict"):
            assert run[f"{phase}_samples_per_second"] > 0, (name, phase)
        assert 0 < run["train_mfu"] < 1, name
        assert 0 < run["train_padding_fraction"] < 1, name
        assert run["peak_memory_mb"] > 0, name
        # On a GPU the memory column is the GPU's, else the process's RSS.
        expected_memory = run["gpu_peak_memory_mb"] if EXPECTED_DEVICE == "cuda" else run["peak_rss_mb"]
        assert run["peak_memory_mb"] == expected_memory, name
    assert rows["tutorial"]["vs_tutorial"] == {"train": 1.0, "eval": 1.0, "predict": 1.0}


def test_the_quick_bench_prints_one_table_line_per_row(smoke):
    _, result = smoke
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and " fp32 " in line]
    assert [line.split(" | ")[0][2:] for line in table] == list(ROWS)
    assert all(f" {EXPECTED_DEVICE}" in line for line in table)


def test_every_row_trains_the_same_number_of_pairs(smoke):
    """The rows differ in how they batch, not in what they train on: the counts behind samples/s agree."""
    output, _ = smoke
    counts = output["models"]["small"]["counts"]
    assert counts == {"train": 32, "dev": 16, "predict": 4}
    for row in output["models"]["small"]["rows"]:
        (run,) = row["runs"]
        if row["row"] != "tool_default":  # the tutorial and the Trainer count what their loaders gave them
            assert (run["train_samples"], run["eval_samples"]) == (counts["train"], counts["dev"]), row["row"]


# ------------------------------------------------------------------------------------------------ the arithmetic

@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> dict:
    """FLOPs statistics of a 2-layer BERT (hidden 32, FFN 64) on the sample data."""
    folder = tmp_path_factory.mktemp("stats-model")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"花呗借还款怎么"]
    build_tiny_bert(str(folder), vocab=vocab, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    splits = {"train": SAMPLE_DIR / "train.json", "dev": SAMPLE_DIR / "dev.json", "predict": SAMPLE_DIR / "test.json"}
    return model_stats(folder, splits, max_length=128)


def test_flops_count_every_weight_outside_the_embeddings(stats):
    """N of 6N + 12LHS: per layer the attention's 4 projections, the FFN's 2, 2 LayerNorms; then the pooler and
    the 2-label classifier. Embeddings are lookups, not matmuls."""
    hidden, ffn, layers = 32, 64, 2
    per_layer = 4 * (hidden * hidden + hidden) + (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * 2 * hidden
    expected = layers * per_layer + (hidden * hidden + hidden) + (hidden * 2 + 2)
    assert stats["non_embedding_parameters"] == expected
    train_tokens, dev_tokens = stats["train_mean_tokens_per_pair"], stats["dev_mean_tokens_per_pair"]
    assert stats["train_flops_per_token"] == 6 * expected + 12 * layers * hidden * train_tokens
    assert stats["dev_forward_flops_per_token"] == 2 * expected + 4 * layers * hidden * dev_tokens


def test_a_run_at_the_ceiling_has_an_mfu_of_exactly_one(stats):
    """The ceilings (samples/s at 100% of the peak) and MFU are the same arithmetic read both ways."""
    peak_gflops = 123.0
    limits = ceilings(stats, peak_gflops, tutorial={"train_samples_per_second": 2.0})
    at_ceiling = {"train_tokens_per_second": limits["train"] * stats["train_mean_tokens_per_pair"],
                  "eval_samples_per_second": limits["eval"], "predict_samples_per_second": limits["predict"]}
    add_mfu(at_ceiling, stats, peak_gflops)
    assert at_ceiling["train_mfu"] == pytest.approx(1.0)
    assert at_ceiling["eval_mfu"] == pytest.approx(1.0)
    assert at_ceiling["predict_mfu"] == pytest.approx(1.0)
    assert limits["train_vs_tutorial"] == pytest.approx(limits["train"] / 2.0)
    halved = add_mfu({"train_tokens_per_second": at_ceiling["train_tokens_per_second"] / 2}, stats, 2 * peak_gflops)
    assert halved["train_mfu"] == pytest.approx(0.25)


def test_the_cpu_peak_is_the_best_matmul_rate_in_each_precision():
    peak = worker_peak({"device": "cpu", "size": 128, "repeats": 3, "threads": 1})
    assert peak["timer"] == "wall clock"
    for precision in ("fp32", "bf16"):
        assert peak[f"{precision}_gflops"] == max(peak[f"{precision}_all_gflops"]) > 0
    assert peak["bf16_emulated"] == bf16_is_emulated(peak["fp32_probe_gflops"], peak["bf16_probe_gflops"])


def test_the_peak_kept_is_the_best_of_the_measurements_before_and_after_the_rows():
    before = {"fp32_gflops": 100.0, "bf16_gflops": 20.0, "device": "cpu"}
    after = {"fp32_gflops": 80.0, "bf16_gflops": 30.0, "device": "cpu"}
    best = best_peak([before, after])
    assert (best["fp32_gflops"], best["bf16_gflops"]) == (100.0, 30.0)
    assert best["measurements"] == [before, after]


def test_bf16_counts_as_emulated_below_half_the_fp32_rate():
    assert bf16_is_emulated(fp32_gflops=116.0, bf16_gflops=1.3)
    assert not bf16_is_emulated(fp32_gflops=356.0, bf16_gflops=356.0)


def test_row_counts_beyond_a_file_repeat_it_for_speed_never_for_accuracy(tmp_path):
    src = tmp_path / "three.json"
    src.write_text('{"n": 1}\n{"n": 2}\n\n{"n": 3}\n', encoding="utf-8")
    assert head_lines(src, tmp_path / "seven.json", 7) == (7, 4)
    assert [json.loads(line)["n"] for line in (tmp_path / "seven.json").read_text().splitlines()] == [1, 2, 3, 1, 2,
                                                                                                      3, 1]
    assert head_lines(src, tmp_path / "two.json", 2) == (2, 0)
    assert head_lines(src, tmp_path / "all.json", None) == (3, 0)
    assert head_lines(src, tmp_path / "once.json", 7, repeat=False) == (3, 0)  # the accuracy check counts each once


def test_the_trainer_rows_name_length_grouping_as_this_transformers_release_does():
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        expected = {"train_sampling_strategy": "group_by_length"}
        assert sampling_arguments(TrainingArguments, "group_by_length") == expected

    @dataclasses.dataclass
    class OlderTrainingArguments:  # the flag before transformers' train_sampling_strategy
        group_by_length: bool = False

    assert sampling_arguments(OlderTrainingArguments, "group_by_length") == {"group_by_length": True}
    assert sampling_arguments(OlderTrainingArguments, "random") == {"group_by_length": False}


def test_memory_is_left_to_the_parent_on_a_cpu():
    assert Memory("cpu").start().peak_mb() is None


# ------------------------------------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
def test_the_gpu_peak_timed_with_cuda_events_agrees_with_the_wall_clock():
    """CUDA events time the GPU's own work: their rate must match a synchronised wall clock around the same
    matmuls (a unit slip, ms for s, would be 1000x off), and bf16 beats strict fp32 on bf16 hardware."""
    import time

    torch.set_float32_matmul_precision("highest")
    n, batch = 4096, 10
    events = max(cuda_matmul_rates(n, torch.float32, repeats=3, batch=batch))
    a = torch.randn(n, n, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batch):
        a @ a
    torch.cuda.synchronize()
    wall = 2 * n**3 * batch / (time.perf_counter() - start) / 1e9
    assert 0.5 * wall < events < 2 * wall
    peak = worker_peak({"device": "cuda", "size": 4096, "repeats": 3, "threads": 1})
    assert peak["timer"] == "CUDA events" and peak["device"].startswith("cuda (")
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert peak["bf16_gflops"] > peak["fp32_gflops"] and not peak["bf16_emulated"]


@pytest.mark.gpu
def test_gpu_memory_is_the_peak_allocated_since_the_row_started():
    memory = Memory("cuda").start()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del block
    assert memory.peak_mb() >= 256
    memory.start()
    assert memory.peak_mb() < 256
