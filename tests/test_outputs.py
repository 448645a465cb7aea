"""What a run leaves in OUTPUT_DIR: a whole best model that loads anywhere, results, metrics and predictions; and
what a later run does to them (never loses them, never mixes phases)."""

import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator
from conftest import (
    fill_disk,
    history,
    plain_hf_predict,
    read_jsonl,
    snapshot,
    train_args,
    write_jsonl,
)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from afqmc_dist.best_model import save_best_model
from afqmc_dist.cli import main
from afqmc_dist.errors import UserError
from afqmc_dist.evaluation import classification_metrics
from afqmc_dist.files import replace_dir
from afqmc_dist.files import write_jsonl as atomic_write_jsonl
from afqmc_dist.run_folder import find_best_dir


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
    correct = sum(p == int(r["label"]) for p, r in zip(plain, dev))
    assert (results["dev_correct"], results["dev_count"]) == (correct, len(dev)) and len(dev) == 101
    assert results["dev_accuracy"] == correct / len(dev)  # exactly: a ratio of the counts, not a float32 mean


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
        atomic_write_jsonl(str(target), rows())
    assert os.listdir(tmp_path) == []
    atomic_write_jsonl(str(target), [{"id": 0}, {"id": 1}])
    assert read_jsonl(target) == [{"id": 0}, {"id": 1}] and os.listdir(tmp_path) == ["predictions.jsonl"]


# --- exact metrics ---------------------------------------------------------------------------------------------


def test_metrics_are_exact_ratios_of_integer_counts():
    """325 right out of 500 is 0.65, not the float32 mean 0.6499999761581421."""
    labels = torch.tensor([1] * 200 + [0] * 300)
    preds = torch.tensor([1] * 150 + [0] * 50 + [0] * 175 + [1] * 125)  # 150 + 175 = 325 right

    metrics = classification_metrics(preds, labels, positive_id=1, label_list=["0", "1"])

    assert (metrics["correct"], metrics["count"], metrics["accuracy"]) == (325, 500, 0.65)
    assert metrics["confusion_matrix"] == [[175, 125], [50, 150]]
    assert metrics["precision"] == 150 / 275 and metrics["recall"] == 150 / 200
    assert metrics["f1"] == 2 * 150 / (275 + 200)


def test_with_three_labels_f1_is_the_macro_average_and_every_label_has_its_own_scores():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0])

    metrics = classification_metrics(preds, labels, positive_id=0, label_list=["e", "n", "c"])

    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    per_class = metrics["per_class"]
    assert per_class["e"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": 4 / 6, "support": 3}
    assert per_class["c"]["f1"] == 6 / 8
    assert metrics["f1"] == sum(c["f1"] for c in per_class.values()) / 3


# --- a later run on the same folder -----------------------------------------------------------------------------


@pytest.fixture
def finished_run(trained_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_run[0], out)
    return out


def test_an_overwrite_that_fails_before_its_first_best_model_puts_the_previous_run_back(
        finished_run, tiny_model, synthetic_data, capsys, fresh_accelerate_state):
    """Never delete, then validate: the replaced run is set aside, and comes back byte for byte when the new run
    dies before it has a model of its own (here a loss that overflows at the second step)."""
    before = snapshot(finished_run)

    status = main([str(a) for a in train_args(tiny_model, synthetic_data, finished_run, "--overwrite_output_dir",
                                              "--learning_rate", "1e30", "--max_grad_norm", "0")])

    assert status == 1
    captured = capsys.readouterr()
    assert f"the previous run's outputs are back in {finished_run}" in captured.out
    assert snapshot(finished_run) == before


def test_an_overwrite_replaces_the_previous_run_once_it_has_a_best_model(finished_run, tiny_model, synthetic_data,
                                                                        capsys, fresh_accelerate_state):
    old_weights = (finished_run / "best" / "model.safetensors").read_bytes()

    status = main([str(a) for a in train_args(tiny_model, synthetic_data, finished_run, "--overwrite_output_dir",
                                              "--num_train_epochs", "1", "--seed", "8")])

    assert status == 0
    assert "are kept in" in capsys.readouterr().out
    assert not (finished_run / ".previous-run").exists()
    assert (finished_run / "best" / "model.safetensors").read_bytes() != old_weights
    assert len(history(finished_run)) == 1  # the new run's metrics only


def test_a_test_run_on_a_trained_folder_keeps_the_training_record(finished_run, synthetic_data, capsys,
                                                                   fresh_accelerate_state):
    training_record = (finished_run / "run_config.json").read_bytes()

    assert main(["--output_dir", str(finished_run), "--test_file", str(synthetic_data["test"]), "--do_test"]) == 0

    assert (finished_run / "run_config.json").read_bytes() == training_record
    assert json.loads((finished_run / "test_config.json").read_text())["do_test"] is True


def test_a_new_prediction_never_leaves_an_old_submission_file_beside_it(finished_run, synthetic_data, tmp_path,
                                                                         fresh_accelerate_state):
    with_ids = write_jsonl(tmp_path / "with_ids.json", [{**r, "id": i} for i, r in
                                                        enumerate(read_jsonl(synthetic_data["test"]))])
    predict = ["--output_dir", str(finished_run), "--do_predict"]

    assert main([*predict, "--predict_file", str(with_ids), "--task_name", "ocnli_50k"]) == 0
    assert len(read_jsonl(finished_run / "ocnli_50k_predict.json")) == 64
    assert main([*predict, "--predict_file", str(synthetic_data["dev"])]) == 0  # no ids: no CLUE file

    assert len(read_jsonl(finished_run / "predictions.jsonl")) == 101
    assert not [name for name in os.listdir(finished_run) if name.endswith("_predict.json")]


def test_leftovers_of_an_interrupted_save_are_removed_when_the_next_run_starts(finished_run, synthetic_data, capsys,
                                                                               fresh_accelerate_state):
    leftovers = [finished_run / "best.tmp", finished_run / "checkpoints" / "step_99.tmp"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    (finished_run / "results.json.tmp").write_text("{")

    assert main(["--output_dir", str(finished_run), "--test_file", str(synthetic_data["test"]), "--do_test"]) == 0

    out = capsys.readouterr().out
    for path in [*leftovers, finished_run / "results.json.tmp"]:
        assert f"removed {path}, left by a save that was interrupted" in out
        assert not path.exists()


# --- the best model: fp32 whatever the engine computes in, and a full disk ------------------------------------------


def tiny_classifier(tiny_model, dtype=torch.float32):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    return model.to(dtype), AutoTokenizer.from_pretrained(tiny_model)


def test_the_best_model_is_saved_in_fp32_even_when_the_engine_holds_bf16_weights(tiny_model, tmp_path,
                                                                                fresh_accelerate_state):
    """DeepSpeed (and pure-bf16 setups) hand back bf16 weights: best/ must still be an fp32 model."""
    accelerator = Accelerator(cpu=True)
    model, tokenizer = tiny_classifier(tiny_model, torch.bfloat16)
    prepared = accelerator.prepare(model)

    save_best_model(accelerator, prepared, tokenizer, str(tmp_path))

    saved = load_file(tmp_path / "best" / "model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}
    originals = dict(model.state_dict())
    assert all(torch.equal(saved[k], originals[k].float()) for k in saved if k in originals)


def test_a_full_disk_while_saving_the_best_model_leaves_the_previous_one_and_no_temporary(tiny_model, small_disk,
                                                                                          fresh_accelerate_state):
    accelerator = Accelerator(cpu=True)
    model, tokenizer = tiny_classifier(tiny_model)
    prepared = accelerator.prepare(model)
    save_best_model(accelerator, prepared, tokenizer, str(small_disk))
    before = snapshot(small_disk / "best")
    fill_disk(small_disk, leave_bytes=50_000)

    with pytest.raises(UserError) as info:
        save_best_model(accelerator, prepared, tokenizer, str(small_disk))

    message = str(info.value)
    assert message.startswith(f"cannot save the best model: writing {small_disk / 'best.tmp'} failed: ")
    assert "MiB free on its disk" in message and message.endswith(f"{small_disk / 'best'} is as it was")
    assert not (small_disk / "best.tmp").exists()
    assert snapshot(small_disk / "best") == before


def test_a_run_says_what_it_does_in_its_own_lines_without_library_tables_or_bars(trained_run):
    """The default run's output: one line about the new classifier head (not transformers' LOAD REPORT table, once
    per rank), no "Writing model shards" bar inside the training bar at each best-model save, and a summary that
    counts seconds when the run took less than a minute."""
    _, result = trained_run
    assert "LOAD REPORT" not in result.stdout + result.stderr
    assert "Writing model shards" not in result.stderr and "Loading weights" not in result.stderr
    assert result.stdout.count("classifier head initialised from scratch, as expected when fine-tuning a base "
                               "checkpoint") == 1
    (finished,) = [line for line in result.stdout.splitlines() if line.startswith("run finished in ")]
    took = finished.split("run finished in ")[1].split(" -> ")[0]
    assert took.endswith(" s") and float(took[:-2]) < 60 or took.endswith(" min") and float(took[:-4]) >= 1.0


def test_results_json_holds_the_exact_ratio_of_its_counts_on_a_500_pair_dev_set(tiny_model, synthetic_data,
                                                                               tmp_path, fresh_accelerate_state):
    """500 copies of one pair, 325 labelled "1" and 175 "0": the model answers the same for all, so the accuracy
    is 325/500 or 175/500, which float32 would write as 0.6499999761581421 or 0.3499999940395355."""
    pair = {"sentence1": "花的了是", "sentence2": "我花有他"}
    dev = write_jsonl(tmp_path / "dev.json", [{**pair, "label": "1"}] * 325 + [{**pair, "label": "0"}] * 175)
    out = tmp_path / "out"

    assert main([str(a) for a in train_args(tiny_model, {**synthetic_data, "dev": dev}, out, "--max_steps", "1")]) == 0
    results = json.loads((out / "results.json").read_text())

    assert results["dev_count"] == 500 and results["dev_correct"] in (325, 175)
    assert results["dev_accuracy"] == {325: 0.65, 175: 0.35}[results["dev_correct"]]
