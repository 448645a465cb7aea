"""Two real processes (accelerate launch, gloo on the CPU) give the same answers as one, and write each file once.

The dev file has 101 pairs: not a multiple of 2 x the batch size, so accelerate pads the last batch with repeats
and only gather_for_metrics' de-duplication keeps the count (and the accuracy) exact.
"""

import json
import os
import shutil

import pytest
from conftest import CPU_ENV, accelerate_launch, plain_hf_predict, read_jsonl, run_tool, train_args


@pytest.fixture(scope="module")
def two_process_run(tiny_model, synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-proc") / "out"
    result = run_tool(train_args(tiny_model, synthetic_data, out, "--report_to", "wandb", "--run_name", "two-proc",
                                 "--eval_batch_size", "8"),
                      launcher=accelerate_launch(2), env={**CPU_ENV, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stdout and "MULTI_CPU" in result.stdout
    return out


def test_every_dev_pair_is_counted_exactly_once(two_process_run):
    history = read_jsonl(two_process_run / "metrics.jsonl")
    assert len(history) == 8 and all(r["dev_count"] == 101 for r in history)
    assert json.loads((two_process_run / "results.json").read_text())["eval_count"] == 101


def test_two_process_predictions_match_one_process_on_the_same_weights(two_process_run, synthetic_data):
    dev = read_jsonl(synthetic_data["dev"])
    predicted = read_jsonl(two_process_run / "predictions.jsonl")
    inputs = [{k: p[k] for k in ("sentence1", "sentence2", "label")} for p in predicted]
    assert inputs == dev, "each line once, in order"
    one_process = plain_hf_predict(two_process_run / "best", dev)
    assert [int(p["pred_label"]) for p in predicted] == one_process
    accuracy = sum(p == int(r["label"]) for p, r in zip(one_process, dev)) / len(dev)
    assert json.loads((two_process_run / "results.json").read_text())["dev_accuracy"] == pytest.approx(accuracy)


def test_the_tools_own_one_process_evaluation_agrees(two_process_run, synthetic_data, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    shutil.copytree(two_process_run / "best", single / "best")
    result = run_tool(["--test_file", synthetic_data["test"], "--predict_file", synthetic_data["dev"],
                       "--output_dir", single, "--do_test", "--do_predict"])
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = read_jsonl(two_process_run / "predictions.jsonl"), read_jsonl(single / "predictions.jsonl")
    assert [p["pred_label"] for p in two] == [p["pred_label"] for p in one]
    assert [p["pred_prob"] for p in two] == pytest.approx([p["pred_prob"] for p in one], abs=1e-5)
    test_two = json.loads((two_process_run / "test_results.json").read_text())
    test_one = json.loads((single / "test_results.json").read_text())
    assert test_two["test_count"] == test_one["test_count"] == 64
    assert test_two["test_accuracy"] == test_one["test_accuracy"]


def test_files_are_written_once_by_the_main_process(two_process_run):
    names = sorted(os.listdir(two_process_run))
    assert names == ["best", "metrics.jsonl", "predictions.jsonl", "results.json", "test_results.json", "wandb"]
    runs = [d for d in os.listdir(two_process_run / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1, "one W&B run for the whole job, from the main process"
    assert any(f.endswith(".wandb") for f in os.listdir(two_process_run / "wandb" / runs[0]))
