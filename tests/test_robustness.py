"""No traceback and no loss: a failure is one line and leaves the run folder as it was (real processes).

Each test checks the exit status, that stderr ends with the tool's one line and holds no traceback, and that a
previous run in the folder (best/, checkpoints) is byte-identical afterwards. Other cases of the same contract
live beside the code they exercise: damaged and full-disk checkpoints in test_checkpoints.py, inputs that pass the
reader and crash later in test_inputs.py, the output folder's phases and leftovers in test_outputs.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
from conftest import last_error_line, limit, run_tool, snapshot, start_tool, train_args, write_jsonl


@pytest.fixture
def previous_run(trained_run, tmp_path):
    """A finished run (best/, results, metrics, predictions) with a checkpoint, in a folder of its own."""
    out = tmp_path / "out"
    shutil.copytree(trained_run[0], out)
    (out / "checkpoints" / "step_8").mkdir(parents=True)
    (out / "checkpoints" / "step_8" / "model.safetensors").write_bytes(b"a checkpoint of the previous run")
    return out


def test_an_overwrite_whose_streamed_training_file_is_bad_deletes_nothing(previous_run, tiny_model, synthetic_data,
                                                                          tmp_path):
    """The worst case found: --overwrite_output_dir --streaming with a lone UTF-16 surrogate on line 5 (valid
    JSON) deleted the previous best/, checkpoints and metrics, then died in the tokenizer."""
    lines = synthetic_data["train"].read_text(encoding="utf-8").splitlines()
    lines[4] = json.dumps({"sentence1": "a\ud800", "sentence2": "的了", "label": "1"})  # json.dumps escapes it
    bad = tmp_path / "train.json"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = snapshot(previous_run)

    result = run_tool(train_args(tiny_model, {**synthetic_data, "train": bad}, previous_run, "--overwrite_output_dir",
                                 "--streaming"))

    assert result.returncode == 2
    assert last_error_line(result.stderr).startswith(f"error: {bad}:5: ")
    assert snapshot(previous_run) == before


def test_an_overwrite_that_fails_after_it_started_training_puts_the_previous_run_back(previous_run, tiny_model,
                                                                                      synthetic_data):
    """Not every failure can be seen up front (here the loss overflows at the second step): the replaced run was
    set aside, not deleted, and comes back whole."""
    before = snapshot(previous_run)

    result = run_tool(train_args(tiny_model, synthetic_data, previous_run, "--overwrite_output_dir",
                                 "--learning_rate", "1e30", "--max_grad_norm", "0"))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()][-1].startswith(
        "stopped: the training loss became NaN/inf at step")
    assert f"the previous run's outputs are back in {previous_run}" in result.stdout
    assert snapshot(previous_run) == before


@pytest.mark.parametrize("moment", ["while importing", "while loading data and model"])
def test_a_stop_signal_before_training_starts_is_one_line_status_3_and_nothing_written(tiny_model, synthetic_data,
                                                                                       tmp_path, moment):
    """SIGTERM in the first seconds used to end the process with status 143 and no word (during the imports) or
    with a traceback. 'While loading' is right after the run's first line (the accelerator is up; the data and
    the model come next)."""
    out = tmp_path / "out"
    run = start_tool(train_args(tiny_model, synthetic_data, out), env={"PYTHONUNBUFFERED": "1"})
    if moment == "while importing":
        time.sleep(0.3)
    else:
        while "process(es), device" not in (line := run.stdout.readline()):
            assert line, "the run ended before its first line"
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=limit(60))

    assert run.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("stopped: SIGTERM received") and sum("stopped:" in line for line in lines) == 1
    assert not (out / "checkpoints").exists() and not (out / "best").exists()


def test_a_duplicate_id_is_refused_before_anything_is_written(trained_run, synthetic_data, tmp_path):
    """CLUE's submission file needs one line per id: a repeated id is named with both lines."""
    out = tmp_path / "out"
    shutil.copytree(trained_run[0], out)
    rows = [{"id": i % 40, **{k: r[k] for k in ("sentence1", "sentence2")}}
            for i, r in enumerate(json.loads(line) for line in synthetic_data["dev"].read_text().splitlines())]
    predict_file = write_jsonl(tmp_path / "ids.json", rows)
    before = snapshot(out)

    result = run_tool(["--output_dir", out, "--predict_file", predict_file, "--do_predict"])

    assert result.returncode == 2
    assert last_error_line(result.stderr).startswith(f"error: {predict_file}:41: ")
    assert snapshot(out) == before
