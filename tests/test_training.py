"""The training loop learns, repeats itself under a fixed seed, accumulates gradients as configured, trains for
--max_steps or epochs under any transformers scheduler, and keeps the best model by the chosen metric."""

import json

import pytest
import torch
from conftest import (
    FILLER,
    PLANTED,
    history,
    plain_hf_predict,
    read_jsonl,
    run_tool,
    synthetic_pairs,
    train_args,
    without_timing,
    write_jsonl,
)
from safetensors.torch import load_file
from transformers import get_scheduler

from afqmc_dist.cli import main
from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert


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


# --- how long, how fast, and which model is kept: --max_steps, schedulers, --metric_for_best_model ----------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """A one-layer BERT and 64 training pairs: 4 optimizer steps per epoch at batch 16."""
    root = tmp_path_factory.mktemp("small")
    model = build_tiny_bert(str(root / "model"), vocab=SPECIAL_TOKENS + sorted(set(FILLER + [PLANTED])),
                            hidden_size=32, num_layers=1, num_heads=2)
    return {"model": model, "train": write_jsonl(root / "train.json", synthetic_pairs(64, seed=1)),
            "dev": write_jsonl(root / "dev.json", synthetic_pairs(24, seed=2))}


def run_small(small, out, *extra) -> None:
    status = main([str(a) for a in ["--model_checkpoint", small["model"], "--train_file", small["train"],
                                     "--dev_file", small["dev"], "--output_dir", out, "--do_train", "--batch_size",
                                     "16", "--learning_rate", "1e-3", "--logging_steps", "1", *extra]])
    assert status == 0


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(("max_steps", "evaluated_at"), [(3, [3]), (10, [4, 8, 10])],
                         ids=["shorter than an epoch", "two and a half epochs"])
def test_max_steps_decides_the_length_and_the_schedule_whatever_the_epochs(small, tmp_path, max_steps, evaluated_at):
    out = tmp_path / "out"
    run_small(small, out, "--max_steps", str(max_steps), "--num_train_epochs", "1", "--checkpointing_steps", "2")

    train = history(out, "train")
    assert [r["step"] for r in train] == list(range(1, max_steps + 1))
    assert train[-1]["learning_rate"] == 0.0  # the linear schedule ends exactly at --max_steps
    assert [r["step"] for r in history(out)] == evaluated_at  # each epoch end, and the last step
    assert max(int(p.name[5:]) for p in (out / "checkpoints").iterdir()) == max_steps


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_run_with_max_steps_resumed_part_way_ends_where_the_uninterrupted_one_does(small, tmp_path):
    args = ("--max_steps", "10", "--checkpointing_steps", "6")
    run_small(small, tmp_path / "whole", *args)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run_small(small, tmp_path / "resumed", *args, "--resume_from_checkpoint",
              tmp_path / "whole" / "checkpoints" / "step_6")

    for folder in ("whole", "resumed"):
        assert max(int(p.name[5:]) for p in (tmp_path / folder / "checkpoints").iterdir()) == 10
    want = load_file(tmp_path / "whole" / "checkpoints" / "step_10" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "checkpoints" / "step_10" / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt"]


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_each_scheduler_type_moves_the_learning_rate_as_transformers_defines_it(small, tmp_path, scheduler):
    out = tmp_path / "out"
    run_small(small, out, "--num_train_epochs", "2", "--lr_scheduler_type", scheduler, "--warmup_steps", "2")

    reference = get_scheduler(scheduler, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3),
                              num_warmup_steps=2, num_training_steps=8)
    expected = []
    for _ in range(8):
        reference.optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    logged = [r["learning_rate"] for r in history(out, "train")]
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert json.loads((out / "run_config.json").read_text())["lr_scheduler_type"] == scheduler


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_metric_for_best_model_f1_or_loss_keeps_another_step_than_accuracy_would(small, tmp_path):
    """A dev set that is 5/6 label "0": the majority guess wins on accuracy, not on F1 (AFQMC's trap). The three
    choices see the same evaluations (same seed) and keep three different steps."""
    rows = synthetic_pairs(400, seed=2)
    dev = write_jsonl(tmp_path / "dev.json", [r for r in rows if r["label"] == "1"][:20] +
                      [r for r in rows if r["label"] == "0"][:100])
    data = {**small, "train": write_jsonl(tmp_path / "train.json", synthetic_pairs(256, seed=1)), "dev": dev}
    kept = {}
    for metric in ("accuracy", "f1", "loss"):
        run_small(data, tmp_path / metric, "--num_train_epochs", "3", "--eval_steps", "4", "--seed", "1",
                  "--metric_for_best_model", metric)
        kept[metric] = json.loads((tmp_path / metric / "results.json").read_text())["best_step"]
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    evaluations = without_timing(history(tmp_path / "accuracy"))
    assert evaluations == without_timing(history(tmp_path / "f1")) == without_timing(history(tmp_path / "loss"))
    first_best = {"accuracy": max(evaluations, key=lambda r: r["accuracy"])["step"],
                  "f1": max(evaluations, key=lambda r: r["f1"])["step"],
                  "loss": min(evaluations, key=lambda r: r["loss"])["step"]}
    assert kept == first_best
    assert len(set(kept.values())) == 3, f"the evaluations must disagree for this test to mean something: {kept}"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_three_labels_report_macro_f1_per_class_scores_and_a_3x3_confusion_matrix(tiny_model, tmp_path):
    """An OCNLI-shaped task: entailment if both sentences carry the planted token, neutral if one does,
    contradiction if neither."""
    def relabel(rows):
        names = {2: "entailment", 1: "neutral", 0: "contradiction"}
        return [{**r, "label": names[(PLANTED in r["sentence1"]) + (PLANTED in r["sentence2"])]} for r in rows]

    train = write_jsonl(tmp_path / "train.json", relabel(synthetic_pairs(384, seed=5)))
    dev = write_jsonl(tmp_path / "dev.json", relabel(synthetic_pairs(90, seed=6)))
    out = tmp_path / "out"
    labels = ["entailment", "neutral", "contradiction"]
    assert main([str(a) for a in ["--model_checkpoint", tiny_model, "--train_file", train, "--dev_file", dev,
                                  "--test_file", dev, "--output_dir", out, "--do_train", "--do_test",
                                  "--label_list", *labels, "--positive_label", "entailment", "--num_train_epochs",
                                  "3", "--batch_size", "16", "--learning_rate", "1e-3"]]) == 0

    last = history(out)[-1]
    matrix = last["confusion_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix) and sum(map(sum, matrix)) == 90
    assert last["f1"] == pytest.approx(sum(last[f"f1/{label}"] for label in labels) / 3, abs=1e-12)
    assert last["accuracy"] == sum(matrix[i][i] for i in range(3)) / 90
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["dev_per_class"]) == sorted(labels)
    test = json.loads((out / "test_results.json").read_text())
    assert len(test["test_confusion_matrix"]) == 3 and sorted(test["test_per_class"]) == sorted(labels)
