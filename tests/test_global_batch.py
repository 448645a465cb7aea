"""--global_batch_size: the same seed trains the same model on 1 process, on 2 real processes (accelerate launch,
gloo) and on 1 process accumulating 2 micro-batches.

The training file holds 203 pairs: not a multiple of the global batch of 8, so every epoch ends with a global
batch of 3 pairs, which 2 processes (or 2 micro-batches) can only share with padding copies that must not count.

Weights are compared per tensor, relative to the tensor's largest value, except attention key biases: adding a
constant to every attention score of a row changes nothing after the softmax, so their gradient is
mathematically zero and what they get is rounding noise, which Adam's normalisation turns into full-size steps
that differ between runs. The function (logits, predictions) is what must agree, and it does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FILLER, PLANTED, read_jsonl, run_tool, synthetic_pairs, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert

G = 8
EPOCHS = 2
STEPS = EPOCHS * 26  # ceil(203 / 8) global batches per epoch
LAYOUTS = {
    "1 process": ([], None),
    "2 processes": ([], "cpu_debug_2proc.sh"),
    "1 process x accumulation 2": (["--gradient_accumulation_steps", "2"], None),
}
ZERO_GRADIENT = "attention.self.key.bias"
CHECKPOINT_EVERY = 10  # step_20 lies in the middle of epoch 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("global-batch-data")
    return {"train": write_jsonl(root / "train.json", synthetic_pairs(203, seed=11)),
            "dev": write_jsonl(root / "dev.json", synthetic_pairs(61, seed=12))}


def build_model(path: Path, dropout: float) -> Path:
    build_tiny_bert(str(path), vocab=SPECIAL_TOKENS + sorted(set(FILLER + [PLANTED])), hidden_size=64,
                    num_layers=2, num_heads=2, dropout=dropout)
    return path


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)


def train(model: Path, data: dict, out: Path, layout: str, *extra: str) -> Path:
    flags, script = LAYOUTS[layout]
    result = run_tool(["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"],
                       "--predict_file", data["dev"], "--output_dir", out, "--do_train", "--do_predict",
                       "--global_batch_size", G, "--learning_rate", "1e-3", "--seed", "3", "--logging_steps", "13",
                       *flags, *extra], script=script)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{STEPS}" / "model.safetensors")


def dev_logits(out: Path, weights: dict[str, torch.Tensor], rows: list[dict]) -> torch.Tensor:
    """Logits of the final weights on the dev pairs, computed here with plain transformers on one process."""
    model = AutoModelForSequenceClassification.from_pretrained(out / "best")
    model.load_state_dict(weights)
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    batch = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.fixture(scope="module", params=["random", "length-grouped"])
def runs(request, no_dropout_model, data, tmp_path_factory) -> dict[str, Path]:
    grouping = ["--no_group_by_length"] if request.param == "random" else []
    root = tmp_path_factory.mktemp(f"global-batch-{request.param}")
    return {layout: train(no_dropout_model, data, root / layout.replace(" ", "-"), layout,
                          "--num_train_epochs", str(EPOCHS), "--checkpointing_steps", str(CHECKPOINT_EVERY),
                          *grouping)
            for layout in LAYOUTS}


def test_every_layout_logs_the_same_global_batch_and_steps(runs):
    for layout, out in runs.items():
        config = json.loads((out / "run_config.json").read_text())
        processes = 2 if layout == "2 processes" else 1
        accumulation = 2 if "accumulation" in layout else 1
        assert (config["global_batch_size"], config["num_processes"], config["gradient_accumulation_steps"],
                config["per_device_batch_size"]) == (G, processes, accumulation, G // (processes * accumulation))
        steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "dev/accuracy" in r]
        assert steps == [STEPS // 2, STEPS], layout


def test_the_final_weights_agree_except_where_the_gradient_is_zero(runs, no_dropout_model):
    reference = final_weights(runs["1 process"])
    start = load_file(no_dropout_model / "model.safetensors")
    moved = reference["bert.encoder.layer.0.output.dense.weight"] - start["encoder.layer.0.output.dense.weight"]
    assert moved.abs().max() > 1e-2, "the runs trained: their agreement is not that of untouched copies"
    for layout in ("2 processes", "1 process x accumulation 2"):
        weights = final_weights(runs[layout])
        assert weights.keys() == reference.keys()
        assert len([name for name in reference if ZERO_GRADIENT in name]) == 2  # 2 layers, one key bias each
        assert_same_weights(weights, reference, layout)


def assert_same_weights(weights: dict, reference: dict, what: str) -> None:
    compared = [name for name in reference if ZERO_GRADIENT not in name]
    for name in compared:
        scale = reference[name].abs().max().clamp_min(1e-12)
        assert (weights[name] - reference[name]).abs().max() / scale <= 1e-4, f"{what}: {name}"


@pytest.mark.parametrize(("written_by", "resumed_on"), [("2 processes", "1 process"), ("1 process", "2 processes")])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, no_dropout_model, data, tmp_path, request,
                                                             written_by, resumed_on):
    """Preempted on N processes, requeued on M: mid-epoch checkpoint of one layout, resumed in the other, ends
    where the uninterrupted run ends (dropout 0: the weights to 1e-4, key biases excepted)."""
    if request.node.callspec.params["runs"] != "length-grouped":
        pytest.skip("one batch order is enough for this check (the default, length-grouped)")
    checkpoint = runs[written_by] / "checkpoints" / "step_20"
    out = tmp_path / "resumed"
    flags, script = LAYOUTS[resumed_on]
    result = run_tool(["--model_checkpoint", no_dropout_model, "--train_file", data["train"], "--dev_file",
                       data["dev"], "--output_dir", out, "--do_train", "--global_batch_size", G, "--learning_rate",
                       "1e-3", "--seed", "3", "--logging_steps", "13", "--num_train_epochs", str(EPOCHS),
                       "--checkpointing_steps", str(CHECKPOINT_EVERY), "--resume_from_checkpoint", checkpoint,
                       *flags], script=script)

    assert result.returncode == 0, result.stderr[-4000:]
    processes = {"1 process": 1, "2 processes": 2}
    assert (f"resuming a checkpoint written by {processes[written_by]} process(es) on {processes[resumed_on]}: the "
            "data order, optimizer and schedule continue exactly; dropout masks are drawn differently") in result.stdout
    assert "step 20, epoch 1" in result.stdout
    assert_same_weights(final_weights(out), final_weights(runs[written_by]), f"{written_by} -> {resumed_on}")


def test_dev_logits_and_predictions_agree(runs, data):
    rows = read_jsonl(data["dev"])
    reference = dev_logits(runs["1 process"], final_weights(runs["1 process"]), rows)
    predictions = read_jsonl(runs["1 process"] / "predictions.jsonl")
    assert [p["sentence1"] for p in predictions] == [r["sentence1"] for r in rows]
    for layout in ("2 processes", "1 process x accumulation 2"):
        logits = dev_logits(runs[layout], final_weights(runs[layout]), rows)
        assert (logits - reference).abs().max() <= 1e-4, layout
        assert torch.equal(logits.argmax(-1), reference.argmax(-1)), layout
        assert [p["pred_label"] for p in read_jsonl(runs[layout] / "predictions.jsonl")] == \
            [p["pred_label"] for p in predictions], layout
        assert json.loads((runs[layout] / "results.json").read_text())["best_step"] == \
            json.loads((runs["1 process"] / "results.json").read_text())["best_step"]


def test_with_dropout_every_layout_learns_the_task(tmp_path_factory, synthetic_data):
    """Dropout draws differ between layouts (each process has its own stream), so the models differ; each must
    still learn the synthetic task."""
    model = build_model(tmp_path_factory.mktemp("tiny-bert-dropout"), dropout=0.1)
    root = tmp_path_factory.mktemp("global-batch-dropout")
    for layout in LAYOUTS:
        out = train(model, synthetic_data, root / layout.replace(" ", "-"), layout, "--num_train_epochs", "4",
                    "--warmup_proportion", "0.1")
        accuracy = json.loads((out / "results.json").read_text())["dev_accuracy"]
        assert accuracy > 0.9, f"{layout}: dev accuracy {accuracy}"
