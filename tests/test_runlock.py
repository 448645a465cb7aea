"""One run per output folder: a second run on a folder in use stops before touching it and names the holder; the
lock of a killed run does not block the next one (real processes, real flock)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from conftest import kill_tree, last_error_line, limit, read_jsonl, run_tool, start_tool, without_timing


def run_args(model, data, out, *extra) -> list:
    return ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"], "--output_dir",
            out, "--do_train", "--learning_rate", "1e-3", "--batch_size", "16", "--seed", "7", *extra]


def wait_for_holder(out: Path, process, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not (out / ".afqmc.lock.json").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never took its lock"
        time.sleep(0.05)
    return json.loads((out / ".afqmc.lock.json").read_text())


def test_a_second_run_on_a_folder_in_use_stops_naming_the_holder_and_the_first_run_is_untouched(
        tiny_model, synthetic_data, tmp_path):
    """The retried job whose first attempt is in fact still running: --overwrite_output_dir must not let the two
    interleave their checkpoints and metrics in one folder."""
    solo = tmp_path / "solo"
    assert run_tool(run_args(tiny_model, synthetic_data, solo, "--num_train_epochs", "6")).returncode == 0
    out = tmp_path / "out"
    first = start_tool(run_args(tiny_model, synthetic_data, out, "--num_train_epochs", "6"))
    holder = wait_for_holder(out, first)

    second = run_tool(run_args(tiny_model, synthetic_data, out, "--num_train_epochs", "1", "--overwrite_output_dir"))
    _, first_err = first.communicate(timeout=limit(300))

    assert second.returncode == 2
    error = last_error_line(second.stderr)
    assert error.startswith(f"error: --output_dir {out} is in use by another run (process {holder['pid']} on "
                            f"{socket.gethostname()}, started {holder['started']}: ")
    assert "train.py" in error and "wait for it to end, or use another --output_dir" in error
    assert first.returncode == 0, first_err[-3000:]
    assert not (out / ".previous-run").exists()
    assert without_timing(read_jsonl(out / "metrics.jsonl")) == without_timing(read_jsonl(solo / "metrics.jsonl"))


def test_the_lock_of_a_killed_run_is_taken_over_with_a_line_saying_whose_it_was(tiny_model, synthetic_data,
                                                                               tmp_path):
    out = tmp_path / "out"
    killed = start_tool(run_args(tiny_model, synthetic_data, out, "--num_train_epochs", "20"))
    holder = wait_for_holder(out, killed)
    kill_tree(killed.pid)  # SIGKILL: no chance to release anything
    killed.communicate()

    result = run_tool(run_args(tiny_model, synthetic_data, out, "--num_train_epochs", "1", "--overwrite_output_dir"))

    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"{out}: taking over the lock of a run that ended without releasing it (process {holder['pid']} on "
            f"{socket.gethostname()} (no longer running), started {holder['started']}") in result.stdout
    assert not (out / ".afqmc.lock.json").exists()  # released at the end
    assert not os.path.exists(f"/proc/{holder['pid']}")
