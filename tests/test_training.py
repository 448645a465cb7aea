"""The training loop learns, repeats itself under a fixed seed, and accumulates gradients as configured."""

import json

from conftest import history, plain_hf_predict, read_jsonl, run_tool, train_args, without_timing
from safetensors.torch import load_file


def accuracy(preds, rows):
    return sum(p == int(r["label"]) for p, r in zip(preds, rows)) / len(rows)


def test_learnable_task_climbs_from_chance_to_over_90_percent(trained_run, tiny_model, synthetic_data):
    out, _ = trained_run
    dev = read_jsonl(synthetic_data["dev"])
    untrained = accuracy(plain_hf_predict(tiny_model, dev), dev)
    accuracies = [r["accuracy"] for r in history(out)]
    best = json.loads((out / "results.json").read_text())
    assert untrained <= 0.7, "an untrained classifier should be near chance (50%)"
    assert best["dev_accuracy"] >= 0.9
    assert best["dev_accuracy"] == max(accuracies)
    assert len(accuracies) == 8  # one evaluation per epoch


def test_same_seed_gives_the_same_run(trained_run, tiny_model, synthetic_data, tmp_path):
    out, _ = trained_run
    again = tmp_path / "again"
    result = run_tool(train_args(tiny_model, synthetic_data, again, "--seed", "7"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert without_timing(read_jsonl(again / "metrics.jsonl")) == without_timing(read_jsonl(out / "metrics.jsonl"))
    first, second = load_file(out / "best" / "model.safetensors"), load_file(again / "best" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)


def test_gradient_accumulation_counts_optimizer_steps_and_eval_steps_add_evaluations(tiny_model, synthetic_data,
                                                                                     tmp_path):
    """batch 8 x accumulation 2 over 512 pairs = 32 optimizer steps per epoch, like batch 16; with --eval_steps 10
    the dev set is also evaluated at steps 10, 20, 30 (and always at the end of the epoch)."""
    result = run_tool(train_args(tiny_model, synthetic_data, tmp_path / "out", "--batch_size", "8",
                                 "--gradient_accumulation_steps", "2", "--num_train_epochs", "1", "--eval_steps", "10"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 16 = 8 per process x 1 process(es) x 2 accumulation step(s)" in result.stdout
    assert "1 epoch(s) of 32 optimizer steps, 64 micro-batches per process and epoch" in result.stdout
    assert [r["step"] for r in history(tmp_path / "out")] == [10, 20, 30, 32]


def test_bf16_on_the_cpu_through_the_launch_script(tiny_model, synthetic_data, tmp_path):
    """launch/bf16.sh falls back to the CPU here, where bf16 autocast really runs; the model still learns."""
    result = run_tool(train_args(tiny_model, synthetic_data, tmp_path / "out"), script="bf16.sh")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es), device cpu, precision bf16" in result.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["dev_accuracy"] >= 0.9
