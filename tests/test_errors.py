"""How every entry point ends (errors.py): one line and a distinct exit status, never a traceback on the screen;
the traceback of an unexpected error in OUTPUT_DIR/error.log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, limit, requires, train_args

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


# --- a stop signal in the first seconds, for every command ------------------------------------------------------

def _is_python(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("python")
    except OSError:
        return False


def _start_up_commands(trained_run, synthetic_data, tmp_path) -> dict[str, list[str]]:
    out, _ = trained_run
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {{model_checkpoint: {out / 'best'}, train_file: {synthetic_data['train']}, "
                     f"dev_file: {synthetic_data['dev']}}}\nsearch_space: {{learning_rate: [0.001, 0.002]}}\n"
                     "n_trials: 2\n", encoding="utf-8")
    return {
        "launch/cpu_debug.sh": ["bash", "launch/cpu_debug.sh", *map(str, train_args(
            out / "best", synthetic_data, tmp_path / "run"))],
        "afqmc_dist.predict": [sys.executable, "-m", "afqmc_dist.predict", "--model", str(out / "best"), "--input",
                               str(synthetic_data["dev"]), "--output", str(tmp_path / "predictions.jsonl")],
        "afqmc_dist.sweep": [sys.executable, "-m", "afqmc_dist.sweep", str(sweep), "--output_dir",
                             str(tmp_path / "sweep")],
        "afqmc_dist.report": [sys.executable, "-m", "afqmc_dist.report", str(out), "--output_dir",
                              str(tmp_path / "report")],
    }


@pytest.mark.parametrize("command", ["launch/cpu_debug.sh", "afqmc_dist.predict",
                                     pytest.param("afqmc_dist.sweep", marks=requires("optuna")),
                                     pytest.param("afqmc_dist.report", marks=requires("matplotlib"))])
def test_a_stop_signal_while_a_command_starts_up_is_one_line_and_status_3(command, trained_run, synthetic_data,
                                                                          tmp_path):
    """SIGTERM in the first second (the interpreter importing torch, accelerate, Optuna or matplotlib) used to
    end these commands with status 143 and no word; train.py already said why and exited 3."""
    args = _start_up_commands(trained_run, synthetic_data, tmp_path)[command]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                                    "WANDB_MODE": "disabled"})
    while not _is_python(process.pid):  # a launch script: bash hands over to Python (exec) within milliseconds
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=limit(120))

    assert process.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("stopped: SIGTERM received") and sum("stopped:" in line for line in lines) == 1
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


def test_a_password_in_the_command_line_never_reaches_error_log(tmp_path, monkeypatch, capsys):
    """`--storage postgresql://user:PASSWORD@host/db` on a sweep's command line: error.log recorded it in clear
    (the messages and sweep.json already masked it)."""
    monkeypatch.setattr(sys, "argv", ["python -m afqmc_dist.sweep", "s.yaml", "--storage",
                                      "postgresql://optuna:s3cr%40t@db.example:5432/studies"])
    log_errors_to(str(tmp_path))

    assert exit_status(fail_with(RuntimeError("postgresql://optuna:s3cr%40t@db.example/studies refused"))) == 4

    text = (tmp_path / "error.log").read_text(encoding="utf-8")
    assert "s3cr" not in text and "s3cr" not in capsys.readouterr().err
    assert "--storage postgresql://optuna:***@db.example:5432/studies" in text


STOPPED_DURING_AN_IMPORT = """
import os, shutil, sys, time
from afqmc_dist.preemption import run_command

def work():
    os.mkdir(sys.argv[1])  # a temporary folder that the command removes on any way out
    try:
        import slow_module
        print("imported", slow_module.LOADED, flush=True)
        time.sleep(60)  # the command goes on with its work
    finally:
        shutil.rmtree(sys.argv[1])

sys.exit(run_command(work))
"""


def _command_signalled_during_an_import(tmp_path, module_body: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run a command whose work imports a module that sends the process SIGTERM from its own body."""
    (tmp_path / "slow_module.py").write_text(f"import os, signal, time\n{module_body}\nLOADED = True\n")
    (tmp_path / "command.py").write_text(STOPPED_DURING_AN_IMPORT)
    folder = tmp_path / "temporary"
    result = subprocess.run([sys.executable, str(tmp_path / "command.py"), str(folder)], cwd=ROOT,
                            capture_output=True, text=True, timeout=limit(60),
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    return result, folder


def test_a_stop_signal_during_an_import_waits_for_it_then_stops_cleanly(tmp_path):
    """A stop signal in the middle of a lazy import (tqdm loading multiprocessing while a download was under
    way) used to end the process on the spot: status 3, but the download's temporary folder was left behind."""
    result, folder = _command_signalled_during_an_import(
        tmp_path, "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.5)")

    assert result.returncode == 3, result.stderr
    assert result.stdout == "imported True\n", "the import ran to its end"
    assert result.stderr.startswith("stopped: SIGTERM received: stopped at once (") and result.stderr.count("\n") == 1
    assert not folder.exists(), "the command's own clean-up ran"


def test_a_second_stop_signal_during_a_hanging_import_ends_the_process_at_once(tmp_path):
    result, _ = _command_signalled_during_an_import(
        tmp_path, "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)\nos.kill(os.getpid(), signal.SIGTERM)\n"
                  "time.sleep(600)")

    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert result.stderr == ("stopped: SIGTERM received again while Python was loading slow_module: ended at once, "
                             "without saving or cleaning up\n")
