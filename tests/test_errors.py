"""How every entry point ends (errors.py): one line and a distinct exit status, never a traceback on the screen;
the traceback of an unexpected error in OUTPUT_DIR/error.log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from afqmc_dist import errors
from afqmc_dist.errors import EXIT_INTERNAL, TrainingStopped, UserError, exit_status, log_errors_to


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", errors.STATUS_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    log_errors_to(None)


def fail_with(exception):
    def run():
        raise exception
    return run


def test_an_unexpected_error_is_one_line_naming_the_log_that_holds_its_traceback(tmp_path, capsys):
    log_errors_to(str(tmp_path))

    def run():
        return {}["missing"]  # a bug, as it would happen deep in some library

    assert exit_status(run) == EXIT_INTERNAL == 4
    err = capsys.readouterr().err
    assert err == f"error: unexpected KeyError: 'missing' (details in {tmp_path / 'error.log'})\n"
    log = (tmp_path / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "KeyError: 'missing'" in log and "command: " in log


def test_without_an_output_folder_yet_the_traceback_goes_to_the_temp_folder(capsys):
    assert exit_status(fail_with(RuntimeError("boom"))) == 4
    err = capsys.readouterr().err
    path = err.split("(details in ")[1].rstrip(")\n")
    assert "RuntimeError: boom" in Path(path).read_text(encoding="utf-8")
    os.remove(path)


@pytest.mark.parametrize(("exception", "status", "line"), [
    (UserError("--seed must be ..."), 2, "error: --seed must be ..."),
    (TrainingStopped("SIGTERM received: ...", exit_code=3), 3, "stopped: SIGTERM received: ..."),
    (TrainingStopped("the training loss became NaN/inf at step 2; ..."), 1,
     "stopped: the training loss became NaN/inf at step 2; ..."),
    (TrainingStopped("sweep trial 3 pruned at step 8", exit_code=5), 5, "stopped: sweep trial 3 pruned at step 8"),
    (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C): stopped at once, without saving"),
])
def test_each_way_of_ending_has_its_status_and_its_one_line(capsys, exception, status, line):
    assert exit_status(fail_with(exception)) == status
    assert capsys.readouterr().err == line + "\n"


def test_under_the_launcher_the_status_and_line_go_to_the_status_folder_instead_of_the_screen(tmp_path, monkeypatch,
                                                                                              capsys):
    monkeypatch.setenv(errors.STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    assert exit_status(fail_with(UserError("data.json:3: not valid JSON"))) == 2

    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "rank1.json").read_text()) == {
        "rank": 1, "status": 2, "line": "[rank 1] error: data.json:3: not valid JSON"}
