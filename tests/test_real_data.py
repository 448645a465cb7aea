"""A short run on the real AFQMC split (when ../shared has it): the pipeline holds on real data and the real test
file gives a complete CLUE submission."""

import json

import pytest
from conftest import SHARED, read_jsonl, run_tool

from afqmc_dist.tiny_model import build_tiny_bert

AFQMC = SHARED / "data" / "afqmc"
VOCAB = SHARED / "data" / "bert-base-chinese-tokenizer" / "vocab.txt"
pytestmark = pytest.mark.skipif(not (AFQMC / "test.json").exists() or not VOCAB.exists(),
                                reason="needs ../shared/data (real AFQMC and the bert-base-chinese vocab)")


def test_short_real_run_writes_a_complete_clue_submission(tmp_path):
    model = build_tiny_bert(str(tmp_path / "tiny-bert-zh"), vocab_file=str(VOCAB), hidden_size=64, num_layers=2)
    out = tmp_path / "out"
    result = run_tool(["--model_checkpoint", model, "--train_file", AFQMC / "train.json", "--dev_file",
                       AFQMC / "dev.json", "--test_file", AFQMC / "test.json", "--output_dir", out,
                       "--max_train_samples", "300", "--max_eval_samples", "200", "--num_train_epochs", "1",
                       "--batch_size", "16", "--eval_batch_size", "64", "--learning_rate", "1e-4",
                       "--do_train", "--do_predict"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["dev_count"] == 200

    test_ids = [row["id"] for row in read_jsonl(AFQMC / "test.json")]
    submission = read_jsonl(out / "afqmc_predict.json")
    assert len(submission) == len(test_ids) == 3861
    assert [row["id"] for row in submission] == test_ids
    assert all(set(row) == {"id", "label"} and row["label"] in ("0", "1") for row in submission)
    assert len(read_jsonl(out / "predictions.jsonl")) == 3861
