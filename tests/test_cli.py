"""The user-facing error contract of `train.py`: exit status 2 and one line `error: WHERE: WHAT` on stderr,
no traceback, and nothing half-written in the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FILLER, PLANTED, last_error_line, limit, requires, run_tool, synthetic_pairs, write_jsonl

from afqmc_dist.cli import main
from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-bert-cli")
    build_tiny_bert(str(path), vocab=SPECIAL_TOKENS + sorted(set(FILLER + [PLANTED])), hidden_size=32,
                    num_layers=1, num_heads=2)
    return str(path)


@pytest.fixture
def data(tmp_path) -> dict[str, str]:
    return {"train": str(write_jsonl(tmp_path / "train.json", synthetic_pairs(16, seed=1))),
            "dev": str(write_jsonl(tmp_path / "dev.json", synthetic_pairs(8, seed=2))),
            "output": str(tmp_path / "out")}


def train_args(model_dir: str, data: dict, *extra: str) -> list[str]:
    return ["--model_checkpoint", model_dir, "--train_file", data["train"], "--dev_file", data["dev"],
            "--output_dir", data["output"], "--do_train", "--num_train_epochs", "1", "--batch_size", "4",
            "--cpu", *extra]


def replace_line(path: str, lineno: int, text: str) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    lines[lineno - 1] = text
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def the_error_line(capsys) -> str:
    """stderr of the run, which must be exactly one line: `error: ...`."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, f"expected one line on stderr, got:\n{err}"
    assert err.startswith("error: ") and err.endswith("\n")
    return err.rstrip("\n")


def assert_nothing_half_written(output_dir: str) -> None:
    """Inputs are checked before anything is written: the output folder was not even created."""
    assert not Path(output_dir).exists()


LABELLED = {"sentence1": "的了是", "sentence2": "我有他", "label": "1"}
BAD_DATA = {
    "not JSON": ("train", 3, '{"sentence1": "的了", "sentence2": ', "not valid JSON"),
    "missing key": ("train", 3, json.dumps({"sentence1": "的了是", "label": "1"}), "missing key 'sentence2'"),
    "empty sentence": ("train", 3, json.dumps({**LABELLED, "sentence1": "  "}), "'sentence1' is empty"),
    "label outside the label set": ("train", 3, json.dumps({**LABELLED, "label": "2"}), "label '2' is not one of"),
    "bad dev file": ("dev", 5, json.dumps({**LABELLED, "label": 1.5}), "label 1.5 is not one of"),
}


@pytest.mark.parametrize("which, lineno, text, what", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_bad_data_file_is_one_error_line_naming_file_and_line(model_dir, data, capsys, which, lineno, text, what):
    replace_line(data[which], lineno, text)

    status = main(train_args(model_dir, data))

    assert status == 2
    error = last_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: {data[which]}:{lineno}: ")
    assert what in error
    assert_nothing_half_written(data["output"])


def test_bad_data_file_error_is_the_only_stderr_output(model_dir, data, capsys):
    replace_line(data["train"], 3, "not json")

    assert main(train_args(model_dir, data)) == 2
    assert the_error_line(capsys).startswith(f"error: {data['train']}:3: not valid JSON")


def test_bad_flag_is_one_error_line(model_dir, data, tmp_path, capsys):
    status = main(train_args(model_dir, data, "--learning_rate", "abc"))

    assert status == 2
    error = the_error_line(capsys)
    assert "--learning_rate" in error and "abc" in error
    assert not (tmp_path / "out").exists()  # flags are checked before anything is created


def test_unknown_flag_is_one_error_line(model_dir, data, capsys):
    assert main(train_args(model_dir, data, "--lr", "1e-5")) == 2
    assert "--lr" in the_error_line(capsys)


def test_fp16_on_cpu_is_refused(model_dir, data, capsys):
    status = main(train_args(model_dir, data, "--mixed_precision", "fp16"))

    assert status == 2
    error = the_error_line(capsys)
    assert "fp16" in error and "CPU" in error
    assert_nothing_half_written(data["output"])


def test_a_global_batch_that_does_not_split_is_one_error_line_before_any_work(model_dir, data, capsys):
    args = [a for a in train_args(model_dir, data) if a not in ("--batch_size", "4")]

    status = main([*args, "--global_batch_size", "10", "--gradient_accumulation_steps", "3"])

    assert status == 2
    assert the_error_line(capsys) == ("error: --global_batch_size 10 does not split evenly into 1 process(es) x 3 "
                                      "accumulation step(s): use a multiple of 3")
    assert_nothing_half_written(data["output"])


def test_train_py_reports_a_bad_train_file_without_traceback(model_dir, data):
    replace_line(data["train"], 3, "this is not json")

    result = run_tool(train_args(model_dir, data), env={"ACCELERATE_USE_CPU": "1"}, timeout=limit(120))

    assert result.returncode == 2, result.stderr
    assert last_error_line(result.stderr).startswith(f"error: {data['train']}:3: not valid JSON")
    assert_nothing_half_written(data["output"])


def test_test_or_predict_without_a_trained_model_says_so(data, tmp_path, capsys):
    test_file = write_jsonl(tmp_path / "test.json", synthetic_pairs(4, seed=3))
    status = main(["--test_file", str(test_file), "--output_dir", data["output"], "--do_test", "--cpu"])

    assert status == 2
    assert the_error_line(capsys) == f"error: {data['output']}/best: no trained model here; run --do_train first"
    assert_nothing_half_written(data["output"])


def test_testing_with_other_labels_than_the_model_was_trained_with_is_refused(trained_run, tmp_path, capsys):
    out, _ = trained_run
    test_file = write_jsonl(tmp_path / "test.json", [{"sentence1": "的了", "sentence2": "是在", "label": "b"}])
    status = main(["--test_file", str(test_file), "--output_dir", str(out), "--do_test", "--label_list", "a", "b",
                   "--positive_label", "b", "--cpu"])

    assert status == 2
    error = the_error_line(capsys)
    assert "was trained with labels ['0', '1'], but --label_list is ['a', 'b']" in error
    assert not (out / "test_results.json").read_text().count('"b"')  # the earlier results are untouched


@requires("wandb")
def test_required_wandb_without_a_login_or_offline_mode_is_one_clear_error(model_dir, data, tmp_path, monkeypatch,
                                                                           capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))

    assert main(train_args(model_dir, data, "--report_to", "wandb", "--require_tracker")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --report_to wandb: W&B did not start") and "WANDB_MODE=offline" in error
    assert not (Path(data["output"]) / "best").exists()
