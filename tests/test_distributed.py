"""Two real processes (launch/cpu_debug_2proc.sh: accelerate launch, gloo on the CPU) give the same answers as
one, and write each file once.

The dev file has 101 pairs: not a multiple of 2 x the batch size, so accelerate pads the last batch with repeats
and only gather_for_metrics' de-duplication keeps the count (and the accuracy) exact.
"""

import json
import os
import shutil

import pytest
from conftest import history, plain_hf_predict, read_jsonl, requires, run_tool, train_args
from wandb_offline import read_run


@pytest.fixture(scope="module")
def two_process_run(tiny_model, synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-proc") / "out"
    result = run_tool(train_args(tiny_model, synthetic_data, out, "--report_to", "wandb", "--run_name", "two-proc",
                                 "--eval_batch_size", "8"),
                      script="cpu_debug_2proc.sh", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stdout and "MULTI_CPU" in result.stdout
    return out, result


def test_every_dev_pair_is_counted_exactly_once(two_process_run):
    out, _ = two_process_run
    evaluations = history(out)
    assert len(evaluations) == 8 and all(r["count"] == 101 for r in evaluations)
    assert json.loads((out / "results.json").read_text())["dev_count"] == 101


def test_two_process_predictions_match_one_process_on_the_same_weights(two_process_run, synthetic_data):
    out, _ = two_process_run
    dev = read_jsonl(synthetic_data["dev"])
    predicted = read_jsonl(out / "predictions.jsonl")
    inputs = [{k: p[k] for k in ("sentence1", "sentence2", "label")} for p in predicted]
    assert inputs == dev, "each line once, in order"
    one_process = plain_hf_predict(out / "best", dev)
    assert [int(p["pred_label"]) for p in predicted] == one_process
    accuracy = sum(p == int(r["label"]) for p, r in zip(one_process, dev)) / len(dev)
    assert json.loads((out / "results.json").read_text())["dev_accuracy"] == pytest.approx(accuracy)


def test_the_tools_own_one_process_evaluation_agrees(two_process_run, synthetic_data, tmp_path):
    out, _ = two_process_run
    single = tmp_path / "single"
    single.mkdir()
    shutil.copytree(out / "best", single / "best")
    result = run_tool(["--test_file", synthetic_data["test"], "--predict_file", synthetic_data["dev"],
                       "--output_dir", single, "--do_test", "--do_predict"])
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = read_jsonl(out / "predictions.jsonl"), read_jsonl(single / "predictions.jsonl")
    assert [p["pred_label"] for p in two] == [p["pred_label"] for p in one]
    assert [p["pred_prob"] for p in two] == pytest.approx([p["pred_prob"] for p in one], abs=1e-5)
    test_two = json.loads((out / "test_results.json").read_text())
    test_one = json.loads((single / "test_results.json").read_text())
    assert test_two["test_count"] == test_one["test_count"] == 64
    assert test_two["test_accuracy"] == test_one["test_accuracy"]


def test_files_are_written_once_by_the_main_process(two_process_run):
    out, _ = two_process_run
    names = sorted(set(os.listdir(out)) - {"wandb"})  # W&B's own folder, where W&B is installed: see below
    # .afqmc.lock: the folder's lock file (runlock.py), free again: flock locks are released, not deleted
    assert names == [".afqmc.lock", "best", "metrics.jsonl", "predictions.jsonl", "results.json", "run_config.json",
                     "test_results.json"]
    steps = [r["step"] for r in history(out, "train")]
    assert steps == sorted(set(steps)), "each training record once"


def test_one_progress_bar_drawn_by_the_local_main_process(two_process_run):
    _, result = two_process_run
    assert result.stderr.count("train:   0%") == 1, "the progress bar is drawn by the local main process only"
    assert "samples_s=" in result.stderr and "lr=" in result.stderr and "loss=" in result.stderr


@requires("wandb")
def test_one_wandb_run_from_the_main_process_holds_the_results(two_process_run):
    out, _ = two_process_run
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1, "one W&B run for the whole job, from the main process"
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    summary, config, rows = read_run(run_file)
    results = json.loads((out / "results.json").read_text())
    assert summary["best_dev_accuracy"] == results["dev_accuracy"]
    assert summary["best_step"] == results["best_step"]
    assert config["num_processes"] == 2 and config["global_batch_size"] == 32 and config["learning_rate"] == 1e-3
    assert config["num_parameters"] > 0 and "git_commit" in config and config["mixed_precision"] == "no"
    train_rows = [row for row in rows if "train/loss" in row]
    assert len(train_rows) == 16  # 128 steps, logged every 8
    assert all(row["train/grad_norm"] > 0 and row["train/tokens_per_second"] > 0 for row in train_rows)
    # W&B and metrics.jsonl hold the same numbers under the same names.
    assert [row["train/loss"] for row in train_rows] == [r["loss"] for r in history(out, "train")]
    dev_rows = [row for row in rows if "dev/accuracy" in row]
    assert len(dev_rows) == 8 and all("dev/f1" in row for row in dev_rows)
    assert all(row["dev/confusion_matrix/_type"] == "table-file" for row in dev_rows)  # a W&B table
    test = json.loads((out / "test_results.json").read_text())
    assert summary["test/accuracy"] == test["test_accuracy"]


def test_learning_rate_follows_the_linear_schedule_under_two_processes(two_process_run):
    """accelerate steps a prepared scheduler once per process per optimizer step: the horizon must account for it.
    128 optimizer steps, warm-up 10% (12 steps), peak 1e-3, linear decay to 0 at step 128."""
    out, _ = two_process_run
    lr = {record["step"]: record["learning_rate"] for record in history(out, "train")}
    assert lr[8] == pytest.approx(1e-3 * 8 / 12)
    assert lr[16] == pytest.approx(1e-3 * (128 - 16) / (128 - 12))
    assert lr[128] == 0


def test_streaming_training_shards_the_stream_across_two_processes(tiny_model, synthetic_data, tmp_path):
    """--streaming: each process reads the file and keeps its share of every global batch; the model still learns."""
    out = tmp_path / "out"
    result = run_tool(train_args(tiny_model, synthetic_data, out, "--streaming", "--shuffle_buffer_size", "64"),
                      script="cpu_debug_2proc.sh")
    assert result.returncode == 0, result.stderr[-4000:]
    # 512 pairs in global batches of 2 x 16: 16 optimizer steps per epoch, as with the map-style dataset.
    assert "global batch 32 = 16 per process x 2 process(es)" in result.stdout
    assert "512 pairs, 8 epoch(s) of 16 optimizer steps, 16 micro-batches per process and epoch" in result.stdout
    assert json.loads((out / "results.json").read_text())["dev_accuracy"] >= 0.9
