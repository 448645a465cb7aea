"""`python -m afqmc_dist.predict`: a trained folder predicts a pair or a file as the tool's own `--do_predict` does,
under one process or several, and refuses bad input with one error line, writing nothing.

The reference is the `trained_run` fixture's predictions.jsonl: its `--do_predict` on the synthetic dev file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from accelerate.state import AcceleratorState, GradientState
from conftest import ROOT, fill_disk, free_port, limit, read_jsonl, synthetic_pairs, write_jsonl

from afqmc_dist.predict import main

INPUT_KEYS = ("sentence1", "sentence2", "label")


def reset_accelerate_state() -> None:
    """`Accelerator` state is a process-wide singleton: forget it after each in-process run."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def start(args: list, launch: bool = False, cwd=ROOT) -> subprocess.Popen:
    """Start `python -m afqmc_dist.predict ARGS`, or the same under a real 2-process `accelerate launch` (gloo,
    CPU), in the background: callers start several before waiting on any, to overlap their start-up."""
    module = ["-m", "afqmc_dist.predict", *(a if isinstance(a, bytes) else str(a) for a in args)]
    command = [sys.executable, *module] if not launch else [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *module]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=limit(timeout))
    return process.returncode, out, err


@pytest.fixture(scope="module")
def one_process(trained_run, synthetic_data, tmp_path_factory):
    """The dev file predicted in one (this) process, with the default batch size: (output file, stdout)."""
    out, _ = trained_run
    output = tmp_path_factory.mktemp("predict-one") / "preds.jsonl"
    status = main(["--model", str(out / "best"), "--input", str(synthetic_data["dev"]), "--output", str(output),
                   "--cpu"])
    reset_accelerate_state()
    assert status == 0
    return output


def test_file_predictions_match_the_tools_do_predict(one_process, trained_run, synthetic_data):
    out, _ = trained_run
    reference, predicted = read_jsonl(out / "predictions.jsonl"), read_jsonl(one_process)
    assert len(predicted) == len(reference) == 101
    assert [{k: p[k] for k in INPUT_KEYS} for p in predicted] == read_jsonl(synthetic_data["dev"]), "input order"
    assert [p["pred_label"] for p in predicted] == [p["pred_label"] for p in reference]
    assert [p["pred_prob"] for p in predicted] == pytest.approx([p["pred_prob"] for p in reference], abs=1e-5)
    assert os.listdir(one_process.parent) == ["preds.jsonl"], "no scratch files, no CLUE file without ids"


def test_a_pair_prints_the_label_and_probability_of_its_line_in_do_predict(trained_run):
    out, _ = trained_run
    reference = read_jsonl(out / "predictions.jsonl")
    # The first pair predicted "1" and the first predicted "0" (the synthetic task yields both).
    lines = [next(p for p in reference if p["pred_label"] == label) for label in ("1", "0")]
    runs = [start(["--model", out / "best", p["sentence1"], p["sentence2"]]) for p in lines]
    for line, run in zip(lines, runs):
        status, stdout, stderr = finish(run)
        assert status == 0, stderr[-3000:]
        assert re.fullmatch(r"[01]\t[01]\.\d{6}\n", stdout), f"one line LABEL<TAB>PROB, got {stdout!r}"
        label, prob = stdout.split("\t")
        assert label == line["pred_label"]
        assert float(prob) == pytest.approx(line["pred_prob"], abs=1e-5)


def test_two_processes_write_the_one_process_predictions_once(one_process, trained_run, synthetic_data, tmp_path):
    """Batches of 8 on 2 processes, pieces of 10 pairs: 101 pairs leave a short last piece and a round in which
    one process has no piece; each pair is still written once, in input order, by the main process only."""
    out, _ = trained_run
    output = tmp_path / "preds.jsonl"
    status, stdout, stderr = finish(start(["--model", out / "best", "--input", synthetic_data["dev"], "--output",
                                           output, "--batch_size", "8", "--piece_size", "10"], launch=True))
    assert status == 0, stderr[-4000:]
    assert stdout.count("101 predictions") == 1
    two, one = read_jsonl(output), read_jsonl(one_process)
    assert [{k: p[k] for k in INPUT_KEYS} for p in two] == [{k: p[k] for k in INPUT_KEYS} for p in one]
    assert [p["pred_label"] for p in two] == [p["pred_label"] for p in one]
    assert [p["pred_prob"] for p in two] == pytest.approx([p["pred_prob"] for p in one], abs=1e-5)
    assert os.listdir(tmp_path) == ["preds.jsonl"]


def test_inputs_with_ids_also_get_the_clue_file_beside_the_output(trained_run, tmp_path, capsys):
    out, _ = trained_run
    rows = [{"id": i, **{k: v for k, v in r.items() if k != "label"}} for i, r in enumerate(synthetic_pairs(5, 9))]
    pairs = write_jsonl(tmp_path / "pairs.json", rows)
    output = tmp_path / "preds" / "test.jsonl"
    output.parent.mkdir()

    assert main(["--model", str(out / "best"), "--input", str(pairs), "--output", str(output), "--cpu"]) == 0

    predicted = read_jsonl(output)
    assert [{k: p[k] for k in ("id", "sentence1", "sentence2")} for p in predicted] == rows
    clue = read_jsonl(output.parent / "afqmc_predict.json")
    assert clue == [{"id": p["id"], "label": p["pred_label"]} for p in predicted]
    assert sorted(os.listdir(output.parent)) == ["afqmc_predict.json", "test.jsonl"]
    assert "5 predictions" in capsys.readouterr().out


ERRORS = {
    "missing model folder": (["--model", "{tmp}/nowhere", "--input", "{input}", "--output", "{output}"],
                             "error: {tmp}/nowhere: no trained model here; run --do_train first"),
    "bad input line": (["--model", "{model}", "--input", "{bad}", "--output", "{output}"],
                       "error: {bad}:3: not valid JSON"),
    "neither a pair nor --input": (["--model", "{model}"], "error: give two sentences, or --input FILE"),
    "one sentence only": (["--model", "{model}", "的了是"], "error: give two sentences, or --input FILE"),
    "an empty sentence": (["--model", "{model}", "的了是", " "], "error: the two sentences must not be empty"),
    "both a pair and --input": (["--model", "{model}", "的了", "是在", "--input", "{input}", "--output", "{output}"],
                                "error: give either two sentences or --input, not both"),
    "--input without --output": (["--model", "{model}", "--input", "{input}"],
                                 "error: --input and --output go together"),
    "--output is the input": (["--model", "{model}", "--input", "{bad}", "--output", "{bad}"],
                              "error: --output {bad} is the --input file"),
    "unknown flag": (["--model", "{model}", "--input", "{input}", "--output", "{output}", "--batchsize", "8"],
                     "error: unrecognized arguments: --batchsize"),
    "bad input line, output in a new folder": (
        ["--model", "{model}", "--input", "{bad}", "--output", "{tmp}/new/folder/preds.jsonl"],
        "error: {bad}:3: not valid JSON"),
    "--output is a folder": (["--model", "{model}", "--input", "{input}", "--output", "{tmp}"],
                             "error: --output {tmp} is a folder: give a file name (or - for stdout)"),
    "a base checkpoint": (["--model", "{base}", "的了", "是在"],
                          ("error: {base}: no trained classification head: classifier.bias, classifier.weight not "
                           "in its weights")),
    "a sentence that is not text": (["--model", "{model}", "的了", "\udcbb\udca8"],
                                    ("error: the second sentence is not UTF-8 text (byte 0xbb at character 1): is "
                                     "the terminal set to another encoding, such as GBK?")),
}


@pytest.mark.parametrize("args, error", ERRORS.values(), ids=ERRORS.keys())
def test_errors_are_one_line_exit_2_and_nothing_written(trained_run, synthetic_data, tiny_model, tmp_path, capsys,
                                                        args, error):
    out, _ = trained_run
    lines = synthetic_data["dev"].read_text(encoding="utf-8").splitlines()
    lines[2] = '{"sentence1": "的了", "sentence2": '
    bad = tmp_path / "pairs.json"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = bad.read_text(encoding="utf-8")
    values = {"tmp": tmp_path, "model": out / "best", "input": synthetic_data["dev"], "bad": bad,
              "output": tmp_path / "preds.jsonl", "base": tiny_model}

    status = main([a.format(**values) for a in args] + ["--cpu"])

    captured = capsys.readouterr()
    assert status == 2
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(error.format(**values)), captured.err
    assert captured.out == ""
    assert os.listdir(tmp_path) == ["pairs.json"] and bad.read_text(encoding="utf-8") == before, "nothing written"


BAD_INPUTS = {
    "a lone surrogate": ('{"id": 1, "sentence1": "的了\\udc80", "sentence2": "是在"}',
                         "{input}:2: 'sentence1' holds '\\udc80', a lone UTF-16 surrogate"),
    "a duplicate id": ('{"id": 0, "sentence1": "的了", "sentence2": "是在"}',
                       "{input}:2: id 0 is also the id of line 1; every id must be unique"),
    "a null id": ('{"id": null, "sentence1": "的了", "sentence2": "是在"}',
                  "{input}:2: id 'id' must be a string or a number, got null"),
}


@pytest.mark.parametrize("second, error", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_input_lines_that_would_break_the_outputs_are_refused(trained_run, tmp_path, capsys, second, error):
    out, _ = trained_run
    source = tmp_path / "pairs.json"
    source.write_text('{"id": 0, "sentence1": "的了", "sentence2": "是在"}\n' + second + "\n", encoding="utf-8")

    status = main(["--model", str(out / "best"), "--input", str(source), "--output", str(tmp_path / "p" / "x.jsonl"),
                   "--cpu"])

    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"error: {error.format(input=source)}") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["pairs.json"]


def test_output_in_a_folder_that_does_not_exist_yet_creates_it(one_process, trained_run, synthetic_data, tmp_path):
    out, _ = trained_run
    output = tmp_path / "new" / "folder" / "preds.jsonl"

    assert main(["--model", str(out / "best"), "--input", str(synthetic_data["dev"]), "--output", str(output),
                 "--cpu"]) == 0

    assert output.read_bytes() == one_process.read_bytes()
    assert os.listdir(output.parent) == ["preds.jsonl"]


def test_output_dash_streams_one_json_line_per_pair_on_stdout(one_process, trained_run, tmp_path):
    """For pipelines: stdout holds the predictions only (what OUTPUT would hold), messages go to stderr, and no
    file is written, not even the CLUE file the ids would give."""
    out, _ = trained_run
    rows = [{"id": i, **r} for i, r in enumerate(read_jsonl(one_process))]
    pairs = write_jsonl(tmp_path / "pairs.json", [{k: r[k] for k in ("id", *INPUT_KEYS)} for r in rows])

    status, stdout, stderr = finish(start(["--model", out / "best", "--input", pairs, "--output", "-"], cwd=tmp_path))

    assert status == 0, stderr[-3000:]
    assert [json.loads(line) for line in stdout.splitlines()] == rows
    assert stderr.splitlines()[-1].startswith(f"{len(rows)} predictions (")
    assert os.listdir(tmp_path) == ["pairs.json"]


def test_output_dash_with_standard_output_closed_is_one_line(trained_run, synthetic_data):
    out, _ = trained_run
    command = " ".join([sys.executable, "-m", "afqmc_dist.predict", "--model", str(out / "best"), "--input",
                        str(synthetic_data["dev"]), "--output", "-"])
    result = subprocess.run(["bash", "-c", f"{command} >&-"], cwd=ROOT, capture_output=True, text=True,
                            timeout=limit(120))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --output -: standard output is closed; give a file, or run without closing it (>&-)"]


def test_a_sentence_in_another_encoding_than_utf8_is_refused(trained_run):
    """A GBK terminal passes GBK bytes: Python keeps each byte that is not UTF-8 as a lone surrogate."""
    out, _ = trained_run
    status, stdout, stderr = finish(start(["--model", out / "best", "花呗".encode("gbk"), "借呗"]))

    assert status == 2 and stdout == ""
    assert stderr == "error: the first sentence is not UTF-8 text (byte 0xbb at character 1): is the terminal set " \
                     "to another encoding, such as GBK? Set it to UTF-8, or use --input FILE\n"


@pytest.fixture
def full_disk(small_disk):
    fill_disk(small_disk, leave_bytes=0)
    return small_disk


def test_a_full_disk_is_one_line_and_leaves_no_folder_or_file(trained_run, synthetic_data, full_disk, capsys):
    out, _ = trained_run
    output = full_disk / "new" / "preds.jsonl"

    status = main(["--model", str(out / "best"), "--input", str(synthetic_data["dev"]), "--output", str(output),
                   "--cpu"])

    err = capsys.readouterr().err
    last = err.split("\r")[-1].lstrip()  # after the progress bar of the predictions, made before the write
    assert status == 2
    assert last.startswith("error: ") and "No space left on device" in last, err
    assert err.count("error:") == 1 and last.count("\n") == 1
    assert os.listdir(full_disk) == ["ballast"], "the new folder and the scratch files are removed"
