"""--torch_compile on the CPU (inductor's C++ code): training, evaluation and prediction give what eager mode gives,
and batches of two sequence lengths cost a bounded number of compilations, not one per batch."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch._dynamo
from conftest import FILLER, PLANTED, read_jsonl, write_jsonl
from safetensors.torch import load_file

from afqmc_dist.cli import main
from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]

# Compiled kernels reorder floating-point sums: the stated tolerance for logits-derived numbers and weights.
TOLERANCE = 1e-4
MAX_COMPILED_GRAPHS = 8  # training forward and backward, evaluation forward, each static then dynamic at most


def two_length_pairs(n: int, seed: int) -> list[dict]:
    """Pairs of either 3-5 or 20-26 characters per sentence: two sequence-length buckets (16 and 64 tokens once
    padded to a multiple of 16); label "1" iff both sentences carry the planted character."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        low, high = (3, 5) if i % 2 else (20, 26)
        positive = rng.random() < 0.5
        sentences = []
        for planted in (positive, positive or rng.random() < 0.5):
            chars = rng.choices(FILLER, k=rng.randint(low, high))
            if planted:
                chars[rng.randrange(len(chars))] = PLANTED
            sentences.append("".join(chars))
        rows.append({"sentence1": sentences[0], "sentence2": sentences[1], "label": "1" if positive else "0"})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    model = root / "model"
    # No dropout: compiled dropout draws from its own random stream, so only a dropout-free run can match eager.
    build_tiny_bert(str(model), vocab=SPECIAL_TOKENS + sorted(set(FILLER + [PLANTED])), hidden_size=32,
                    num_layers=1, num_heads=2, dropout=0.0)
    return {"model": model, "train": write_jsonl(root / "train.json", two_length_pairs(96, 1)),
            "dev": write_jsonl(root / "dev.json", two_length_pairs(40, 2))}


def run(files, out, *extra) -> int:
    return main([str(a) for a in [
        "--model_checkpoint", files["model"], "--train_file", files["train"], "--dev_file", files["dev"],
        "--test_file", files["dev"], "--output_dir", out, "--do_train", "--do_test", "--do_predict", "--max_steps",
        "6", "--eval_steps", "3", "--batch_size", "8", "--pad_to_multiple_of", "16", "--max_seq_length", "64",
        "--learning_rate", "1e-3", "--cache_dir", "none", "--cpu", *extra]])


def test_torch_compile_trains_evaluates_and_predicts_as_eager_with_few_compilations(files, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert run(files, tmp_path / "eager") == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0, "eager mode compiles nothing"

    assert run(files, tmp_path / "compiled", "--torch_compile") == 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert 1 <= graphs <= MAX_COMPILED_GRAPHS, f"{graphs} graphs compiled for 2 sequence lengths"
    dev = [[r for r in read_jsonl(out / "metrics.jsonl") if "dev/loss" in r] for out in (eager, compiled)]
    assert [r["step"] for r in dev[0]] == [r["step"] for r in dev[1]] == [3, 6]
    for a, b in zip(*dev):
        assert a["dev/confusion_matrix"] == b["dev/confusion_matrix"]
        assert b["dev/loss"] == pytest.approx(a["dev/loss"], abs=TOLERANCE)
    weights = [load_file(out / "best" / "model.safetensors") for out in (eager, compiled)]
    assert weights[0].keys() == weights[1].keys(), "compiling keeps the parameter names"
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=TOLERANCE, rtol=0), name
    predictions = [read_jsonl(out / "predictions.jsonl") for out in (eager, compiled)]
    assert [p["pred_label"] for p in predictions[0]] == [p["pred_label"] for p in predictions[1]]
    tests = [json.loads((out / "test_results.json").read_text()) for out in (eager, compiled)]
    assert tests[0]["test_accuracy"] == tests[1]["test_accuracy"]
