"""What a run leaves in OUTPUT_DIR: a whole best model that loads anywhere, results, metrics and predictions."""

import json
import os

import pytest
from conftest import history, plain_hf_predict, read_jsonl

from afqmc_dist.outputs import find_best_dir, replace_dir, write_jsonl


def test_best_model_is_a_complete_hugging_face_folder(trained_run):
    out, _ = trained_run
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(out / "best"))
    assert not [name for name in os.listdir(out) if name.startswith("best.")], "no temporary folders left"


def test_best_model_loads_with_plain_transformers_and_reproduces_the_tools_predictions(trained_run, synthetic_data):
    out, _ = trained_run
    dev = read_jsonl(synthetic_data["dev"])
    predicted = read_jsonl(out / "predictions.jsonl")
    plain = plain_hf_predict(out / "best", dev)
    assert [int(p["pred_label"]) for p in predicted] == plain
    results = json.loads((out / "results.json").read_text())
    assert results["eval_count"] == len(dev) == 101
    assert results["dev_accuracy"] == sum(p == int(r["label"]) for p, r in zip(plain, dev)) / len(dev)


def test_results_json_records_the_best_evaluation(trained_run):
    out, _ = trained_run
    evaluations = history(out)
    results = json.loads((out / "results.json").read_text())
    best = max(evaluations, key=lambda r: r["accuracy"])  # the first of equals, as the tool keeps it
    assert (results["best_epoch"], results["best_step"]) == (best["epoch"], best["step"])
    assert results["dev_f1"] == best["f1"]
    assert all(r["count"] == 101 for r in evaluations)
    assert [r["epoch"] for r in evaluations] == list(range(1, 9))


def test_test_results_match_an_independent_evaluation(trained_run, synthetic_data):
    out, _ = trained_run
    test = read_jsonl(synthetic_data["test"])
    plain = plain_hf_predict(out / "best", test)
    results = json.loads((out / "test_results.json").read_text())
    assert results["test_count"] == len(test)
    assert results["test_accuracy"] == sum(p == int(r["label"]) for p, r in zip(plain, test)) / len(test)


def test_predictions_keep_every_input_line_in_order(trained_run, synthetic_data):
    out, _ = trained_run
    inputs = read_jsonl(synthetic_data["dev"])
    predicted = read_jsonl(out / "predictions.jsonl")
    assert [{k: p[k] for k in ("sentence1", "sentence2", "label")} for p in predicted] == inputs
    assert all(p["pred_label"] in ("0", "1") and 0.5 <= p["pred_prob"] <= 1.0 for p in predicted)
    assert not (out / "afqmc_predict.json").exists(), "the CLUE file is only written for inputs with ids"


def test_replacing_the_best_folder_never_leaves_it_half_written(tmp_path):
    best = tmp_path / "best"
    for version in ("v1", "v2"):
        tmp = tmp_path / "best.tmp"
        tmp.mkdir()
        (tmp / "weights").write_text(version)
        replace_dir(str(tmp), str(best))
        assert (best / "weights").read_text() == version
    assert sorted(os.listdir(tmp_path)) == ["best"]
    # A crash between the two renames leaves only the previous complete folder, which is then used.
    os.replace(best, tmp_path / "best.old")
    assert find_best_dir(str(tmp_path)) == str(tmp_path / "best.old")


def test_a_file_write_that_fails_leaves_neither_the_file_nor_a_temporary(tmp_path):
    target = tmp_path / "predictions.jsonl"

    def rows():
        yield {"id": 0}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(str(target), rows())
    assert os.listdir(tmp_path) == []
    write_jsonl(str(target), [{"id": 0}, {"id": 1}])
    assert read_jsonl(target) == [{"id": 0}, {"id": 1}] and os.listdir(tmp_path) == ["predictions.jsonl"]
