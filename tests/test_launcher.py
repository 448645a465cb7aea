"""afqmc_dist.launcher: which line and status a launch ends with, and how signals reach the training processes.

First the choice of line and status, from status files written by errors.py's own `exit_status` (what every
process of the tool runs) in a real folder, their order set with the files' mtimes; then real launches through
launch/cpu_debug.sh (one process) and launch/cpu_debug_2proc.sh (two, over gloo): a bad input file, SIGTERM, a NaN
stop, a killed process and Ctrl-C in a terminal, each checked for its exit status and last line.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, limit, run_tool, start_tool

from afqmc_dist import errors
from afqmc_dist.errors import EXIT_STOPPED, STATUS_DIR_ENV, TrainingStopped, UserError, exit_status
from afqmc_dist.launcher import Forwarder, read_records, verdict

STOPPED = "SIGTERM received: stopped after step 7 and saved out/checkpoints/step_7"
KILLED_RANK_1 = "error: rank 1 was killed by SIGKILL without reporting why (any message of its own is above)"


# --- the line and status, from the status files ------------------------------------------------------------


@pytest.fixture
def status_dir(tmp_path, monkeypatch):
    """A status folder and `finish(rank, error, at)`: rank RANK of 2 ends raising ERROR (None: done), its file
    written at second AT."""
    folder = tmp_path / "status"
    folder.mkdir()
    monkeypatch.setenv(STATUS_DIR_ENV, str(folder))
    monkeypatch.setenv("WORLD_SIZE", "2")
    errors.log_errors_to(str(tmp_path))  # the traceback of an unexpected error goes there

    def finish(rank: int, error: BaseException | None, at: int) -> int:
        monkeypatch.setenv("RANK", str(rank))

        def run():
            if error is not None:
                raise error

        status = exit_status(run)
        os.utime(folder / f"rank{rank}.json", ns=(at * 10**9, at * 10**9))
        return status

    yield folder, finish
    errors.log_errors_to(None)


def test_every_process_done_means_0_and_nothing_to_print(status_dir, capsys):
    folder, finish = status_dir
    finish(0, None, at=1)
    finish(1, None, at=1)
    assert verdict(read_records(str(folder)), exits={}) == (0, [])
    assert capsys.readouterr().err == ""  # under the launcher the processes print nothing themselves


def test_the_first_failure_written_is_the_one_printed(status_dir):
    """Rank 1's bad input ends the run; torch then stops rank 0, whose broken collective is a consequence."""
    folder, finish = status_dir
    finish(1, UserError("train.json:3: not valid JSON"), at=1)
    finish(0, RuntimeError("Connection reset by peer"), at=2)
    assert verdict(read_records(str(folder)), exits={0: 4, 1: 2}) == \
        (2, ["[rank 1] error: train.json:3: not valid JSON"])


def test_a_stop_is_worded_by_rank_0_even_when_another_rank_ends_first(status_dir):
    folder, finish = status_dir
    finish(1, TrainingStopped(STOPPED, EXIT_STOPPED), at=1)  # rank 1 records its status but no line
    finish(0, TrainingStopped(STOPPED, EXIT_STOPPED), at=2)
    assert verdict(read_records(str(folder)), exits={0: 3, 1: 3}) == (3, [f"stopped: {STOPPED}"])


def test_a_process_killed_from_outside_is_the_line_not_the_collective_it_broke(status_dir):
    """kill -9 of rank 1 (the OOM killer) breaks rank 0's next collective: rank 0's unexpected error is a
    consequence, and the line names the rank that was killed."""
    folder, finish = status_dir
    finish(0, RuntimeError("Connection reset by peer"), at=2)
    status, lines = verdict(read_records(str(folder)), exits={0: 4, 1: -signal.SIGKILL})
    assert (status, lines) == (4, [KILLED_RANK_1])


def test_a_process_that_died_without_a_record_is_named_before_the_tools_own_failure(status_dir):
    folder, finish = status_dir
    finish(0, UserError("dev.json:7: not valid JSON"), at=2)
    status, lines = verdict(read_records(str(folder)), exits={0: 2, 1: -signal.SIGKILL})
    assert (status, lines) == (2, [KILLED_RANK_1, "[rank 0] error: dev.json:7: not valid JSON"])


@pytest.mark.parametrize(("exits", "line"), [
    ({0: -signal.SIGKILL}, "error: rank 0 was killed by SIGKILL"),
    ({0: 1}, "error: rank 0 exited with status 1"),  # e.g. Python could not import the tool
    # SIGTERM is what torch sends the other processes when one fails: the other death is the cause.
    ({0: -signal.SIGTERM, 1: -signal.SIGSEGV}, "error: rank 1 was killed by SIGSEGV"),
])
def test_without_any_record_the_dead_process_is_named_and_the_status_is_4(tmp_path, exits, line):
    status, lines = verdict(read_records(str(tmp_path)), exits)
    assert status == 4 and lines == [f"{line} without reporting why (any message of its own is above)"]


def test_a_stop_signal_the_launcher_passed_on_that_killed_a_process_is_a_stop(tmp_path):
    """A SIGTERM that came before the training loop took over the signals (while the model loads, say)."""
    status, lines = verdict(read_records(str(tmp_path)), {0: -signal.SIGTERM}, forwarded=(signal.SIGTERM,))
    assert status == 3
    assert lines == ["stopped: SIGTERM ended rank 0 outside the training loop, so this stop saved no checkpoint"]


def test_a_half_written_status_file_counts_as_missing(tmp_path):
    (tmp_path / "rank0.json").write_text('{"rank": 0, "sta', encoding="utf-8")
    assert read_records(str(tmp_path)) == {}
    assert verdict({}, {0: -signal.SIGKILL})[0] == 4


# --- signals ------------------------------------------------------------------------------------------------

SIGNAL_COUNTER = """
import signal, sys, time
count = 0
def counted(*_):
    global count
    count += 1
signal.signal(signal.SIGUSR1, counted)
print("ready", flush=True)
time.sleep(2)
print(count, flush=True)
"""


def test_a_signal_reaches_every_child_once_even_one_started_after_it():
    """The launch may start the training processes just after the signal came (it was still importing)."""
    def start_child():
        child = subprocess.Popen([sys.executable, "-c", SIGNAL_COUNTER], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"  # its handler is in place
        return child

    with Forwarder(signals=(signal.SIGUSR1,)) as forwarder:
        before = start_child()
        os.kill(os.getpid(), signal.SIGUSR1)  # to this process, as to the launcher; the forwarder records it
        after = start_child()
        forwarder.deliver()
        forwarder.deliver()  # nothing new to pass on
        counts = [int(child.communicate(timeout=limit(30))[0]) for child in (before, after)]

    assert counts == [1, 1]
    assert forwarder.forwarded == (signal.SIGUSR1,)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # put back


# --- the CPU scripts, run for real -------------------------------------------------------------------------

ERROR_LINE = re.compile(r"^(\[rank \d+\] )?error: ")


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ERROR_LINE.match(line)]


def _training_args(model, data, out, *extra) -> list:
    """A run long enough (640 steps) to be stopped while it trains; it checkpoints only when stopped."""
    return ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"],
            "--output_dir", out, "--do_train", "--num_train_epochs", "20", "--batch_size", "16",
            "--logging_steps", "5", "--checkpointing_steps", "100000", *extra]


def _wait_until_training(out: Path, process) -> None:
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists():  # written at the first logging step
        assert process.poll() is None, f"the run ended before training:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["cpu_debug.sh", "cpu_debug_2proc.sh"])
def test_a_bad_input_file_exits_2_with_the_tools_error_line_last_and_once(tiny_model, synthetic_data, tmp_path,
                                                                         script):
    train = tmp_path / "train.json"
    train.write_text(synthetic_data["train"].read_text(encoding="utf-8").replace("\n", "\n{oops\n", 1),
                     encoding="utf-8")
    result = run_tool(_training_args(tiny_model, {**synthetic_data, "train": train}, tmp_path / "out"), script=script)

    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result.stderr) == [last_line(result.stderr)], result.stderr[-3000:]
    assert f"{train}:2" in last_line(result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["cpu_debug.sh", "cpu_debug_2proc.sh"])
def test_sigterm_to_the_script_saves_a_checkpoint_and_exits_3(tiny_model, synthetic_data, tmp_path, script):
    out = tmp_path / "out"
    run = start_tool(_training_args(tiny_model, synthetic_data, out), script=script)
    _wait_until_training(out, run)
    run.send_signal(signal.SIGTERM)  # to the launcher only, as `kill PID` or a job script does
    _, stderr = run.communicate(timeout=limit(120))

    assert run.returncode == 3, stderr[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert last_line(stderr).startswith("stopped: SIGTERM received: stopped after step")
    assert f"saved {checkpoint}" in last_line(stderr) and stderr.count("stopped: ") == 1
    assert "Traceback" not in stderr
@pytest.mark.slow
def test_a_nan_stop_on_two_processes_exits_1_with_rank_0s_line(tiny_model, synthetic_data, tmp_path):
    """Every rank stops at the same step with status 1; only rank 0 words it, and the launcher prints that."""
    result = run_tool(_training_args(tiny_model, synthetic_data, tmp_path / "out", "--learning_rate", "1e30",
                                     "--max_grad_norm", "0", "--num_train_epochs", "1"), script="cpu_debug_2proc.sh")

    assert result.returncode == 1, result.stderr[-3000:]
    assert last_line(result.stderr).startswith("stopped: the training loss became NaN/inf at step ")
    assert result.stderr.count("stopped: ") == 1 and "Traceback" not in result.stderr
@pytest.mark.slow
def test_a_killed_process_is_named_by_rank_and_signal(tiny_model, synthetic_data, tmp_path):
    """kill -9 of rank 1 (what the OOM killer does) leaves no status file: the launcher's last line says which rank
    died and how (not rank 0's broken collective, which follows from it), and the launch exits 4."""
    out = tmp_path / "out"
    run = start_tool(_training_args(tiny_model, synthetic_data, out), script="cpu_debug_2proc.sh")
    _wait_until_training(out, run)
    (rank_1,) = [p for p in psutil.Process(run.pid).children() if p.environ().get("RANK") == "1"]
    rank_1.kill()
    _, stderr = run.communicate(timeout=limit(120))

    assert run.returncode == 4, stderr[-3000:]
    assert last_line(stderr).startswith("error: rank 1 was killed by SIGKILL") and "Traceback" not in stderr


# Make stdin (the pseudo-terminal) the controlling terminal of a new session, then run the command there.
TAKE_TERMINAL = ("import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                 "os.execvp(sys.argv[1], sys.argv[1:])")
@pytest.mark.slow
def test_ctrl_c_in_a_terminal_saves_a_checkpoint_and_exits_3(tiny_model, synthetic_data, tmp_path):
    """A terminal sends Ctrl-C's SIGINT to the launcher AND the training process (one process group); the
    launcher must not pass on a second one, which would mean "quit at once, without saving" to the tool."""
    out = tmp_path / "out"
    terminal, child_side = pty.openpty()
    run = subprocess.Popen([sys.executable, "-c", TAKE_TERMINAL, "bash", str(ROOT / "launch" / "cpu_debug.sh"),
                            *map(str, _training_args(tiny_model, synthetic_data, out))],
                           cwd=ROOT, stdin=child_side, stdout=child_side, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "WANDB_MODE": "disabled",
                                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    os.close(child_side)
    try:
        _wait_until_training(out, run)
        os.write(terminal, b"\x03")  # Ctrl-C
        _, stderr = run.communicate(timeout=limit(120))
    finally:
        os.close(terminal)

    assert run.returncode == 3, stderr[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert last_line(stderr).startswith("stopped: SIGINT received") and f"saved {checkpoint}" in last_line(stderr)


# --- a launch refused before it starts ------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "env", "line"), [
    (["-m", "afqmc_dist.launcher", "--config_file", "missing.yaml", "--cpu", "train.py"], {},
     "error: --config_file missing.yaml: no such file"),
    (["-m", "afqmc_dist.launcher", "--config_file", "{broken}", "--cpu", "train.py"], {},
     "error: --config_file {broken}: not an accelerate config ("),
    (["-m", "afqmc_dist.launcher", "--bogus", "train.py"], {},
     "error: accelerate launch: unrecognized arguments: --bogus (see accelerate launch --help)"),
    (["launch/cpu_debug_2proc.sh", "--do_train"], {"NPROC": "x"},
     "cpu_debug_2proc.sh: NPROC must be a whole number >= 1, got 'x'"),
], ids=["missing config file", "broken config file", "unknown flag", "bad NPROC"])
def test_a_launch_with_bad_arguments_is_one_line_and_status_2(command, env, line, tmp_path):
    """Before: a missing or broken --config_file exited 4 ("unexpected"), an unknown flag or a bad NPROC printed
    accelerate's 115 lines of usage."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [\n", encoding="utf-8")
    command = [word.replace("{broken}", str(broken)) for word in command]
    program = ["bash"] if command[0].endswith(".sh") else [sys.executable]
    result = subprocess.run([*program, *command], cwd=ROOT, capture_output=True, text=True, timeout=limit(120),
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env})

    assert result.returncode == 2
    lines = [text for text in result.stderr.splitlines() if text.strip()]
    assert len(lines) == 1 and lines[0].startswith(line.replace("{broken}", str(broken))), result.stderr[-2000:]
