"""A replaced run is never lost: --overwrite_output_dir sets it aside, every failure puts it back, a set-aside run
that is still there is refused rather than replaced, and `python -m afqmc_dist.restore` brings it back (real
runs, a real read-only mount, a real SIGKILL)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, kill_tree, last_error_line, limit, run_tool, snapshot, start_tool, train_args

from afqmc_dist.cli import main


@pytest.fixture
def finished_run(trained_run, tmp_path):
    """A copy of a finished run (best/, results, metrics, predictions) in a folder of its own."""
    out = tmp_path / "out"
    shutil.copytree(trained_run[0], out)
    return out


def short(model, data, out, *extra) -> list[str]:
    return [str(a) for a in train_args(model, data, out, "--num_train_epochs", "1", *extra)]


def restore(out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "afqmc_dist.restore", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=limit(120))


@pytest.fixture
def undeletable(finished_run):
    """A folder inside the finished run's checkpoints that cannot be removed: a read-only bind mount, as a busy
    file on NFS (.nfsXXXX) or a mount holds a folder in real life. Skipped where mounting is not allowed."""
    pinned = finished_run / "checkpoints" / "step_8" / "pinned"
    pinned.mkdir(parents=True)
    (pinned / "held").write_text("held by another process")
    mounted = subprocess.run(["mount", "--bind", str(pinned), str(pinned)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount a folder here ({mounted.stderr.strip() or 'mount failed'})")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(pinned)], check=True)
    yield finished_run
    subprocess.run(["umount", "-l", str(finished_run / ".previous-run" / "checkpoints" / "step_8" / "pinned")],
                   capture_output=True)
    subprocess.run(["umount", "-l", str(pinned)], capture_output=True)


def test_a_set_aside_run_that_cannot_be_removed_is_said_and_the_next_overwrite_refuses_it(undeletable, tiny_model,
                                                                                        synthetic_data):
    """The completed run B must survive the next --overwrite_output_dir: before, the failed removal of A (the run
    B replaced) was ignored, and the next overwrite deleted B instead of setting it aside."""
    out = undeletable
    replacing = run_tool(short(tiny_model, synthetic_data, out, "--overwrite_output_dir"))
    assert replacing.returncode == 0, replacing.stderr[-3000:]
    assert f"could not remove {out / '.previous-run'}" in replacing.stdout
    assert "Read-only file system" in replacing.stdout or "busy" in replacing.stdout
    finished_b = {path: digest for path, digest in snapshot(out).items() if not path.startswith(".previous-run")}

    again = run_tool(short(tiny_model, synthetic_data, out, "--overwrite_output_dir", "--seed", "3"))

    assert again.returncode == 2
    line = last_error_line(again.stderr)
    assert line.startswith(f"error: --overwrite_output_dir: {out / '.previous-run'} holds a run's outputs (")
    assert f"python -m afqmc_dist.restore {out}" in line
    assert {path: digest for path, digest in snapshot(out).items() if not path.startswith(".previous-run")} \
        == finished_b


def test_a_failure_after_the_set_aside_outside_training_puts_the_previous_run_back(finished_run, tiny_model,
                                                                                   synthetic_data, monkeypatch,
                                                                                   capsys, fresh_accelerate_state):
    """A required tracker that cannot start fails the run after its folder was taken and the old run set aside;
    before, the old run stayed in .previous-run, and the next `--resume_from_checkpoint latest` started afresh
    and deleted it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    before = snapshot(finished_run)

    status = main(short(tiny_model, synthetic_data, finished_run, "--overwrite_output_dir", "--report_to", "mlflow",
                        "--require_tracker"))

    assert status == 2
    captured = capsys.readouterr()
    assert f"the previous run's outputs are back in {finished_run}" in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("error: --report_to mlflow: MLflow did not start (")
    assert snapshot(finished_run) == before
    assert main(short(tiny_model, synthetic_data, finished_run, "--resume_from_checkpoint", "latest")) == 2
    assert snapshot(finished_run) == before


def test_a_run_killed_after_the_set_aside_leaves_it_refused_by_latest_and_restore_brings_it_back(
        finished_run, tiny_model, synthetic_data):
    """SIGKILL gives a run no chance to put anything back: the next runs must refuse, never start afresh over the
    set-aside run, and `python -m afqmc_dist.restore` must bring it back byte for byte."""
    before = snapshot(finished_run)
    killed = start_tool(train_args(tiny_model, synthetic_data, finished_run, "--overwrite_output_dir",
                                   "--num_train_epochs", "50"), env={"PYTHONUNBUFFERED": "1"})
    while "are kept in" not in (line := killed.stdout.readline()):
        assert line, "the run ended before it set the previous run aside"
    kill_tree(killed.pid)
    killed.communicate()
    assert (finished_run / ".previous-run" / "best").is_dir()

    latest = run_tool(train_args(tiny_model, synthetic_data, finished_run, "--resume_from_checkpoint", "latest"))
    tested = run_tool(["--output_dir", finished_run, "--test_file", synthetic_data["test"], "--do_test"])
    restored = restore(finished_run)

    assert latest.returncode == 2 and tested.returncode == 2
    assert last_error_line(latest.stderr).startswith(
        f"error: --resume_from_checkpoint latest (no checkpoint in {finished_run}): {finished_run / '.previous-run'} "
        "holds a run's outputs (")
    assert last_error_line(tested.stderr).startswith(f"error: {finished_run / 'best'}: no trained model here: ")
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"restored the set-aside run in {finished_run} (")
    assert {path: digest for path, digest in snapshot(finished_run).items() if not path.startswith(".afqmc.lock")} \
        == {path: digest for path, digest in before.items() if not path.startswith(".afqmc.lock")}


def test_restore_refuses_a_folder_whose_own_run_has_a_best_model(finished_run):
    (finished_run / ".previous-run").mkdir()
    shutil.copytree(finished_run / "best", finished_run / ".previous-run" / "best")
    before = snapshot(finished_run)

    result = restore(finished_run)

    assert result.returncode == 2
    assert last_error_line(result.stderr) == (
        f"error: {finished_run} has a best model of its own: {finished_run / '.previous-run'} is a leftover of the "
        f"run it replaced; remove {finished_run / '.previous-run'} if you do not need it")
    assert snapshot(finished_run) == before


def test_a_lock_holder_file_that_is_a_folder_is_one_line_and_leaves_no_temporary(finished_run, synthetic_data):
    (finished_run / ".afqmc.lock.json").mkdir()

    result = run_tool(["--output_dir", finished_run, "--test_file", synthetic_data["test"], "--do_test"])

    assert result.returncode == 2
    assert last_error_line(result.stderr).startswith(
        f"error: --output_dir {finished_run}: cannot record who holds its lock in {finished_run / '.afqmc.lock.json'}")
    assert not [path for path in finished_run.iterdir() if path.name.endswith(".tmp")]


def test_the_lock_holder_file_never_records_a_password(tmp_path, monkeypatch):
    from afqmc_dist.run_folder import RunLock

    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", str(tmp_path), "--run_name",
                                      "https://user:token123@example.org/x"])
    lock = RunLock(str(tmp_path))
    lock.acquire()
    try:
        holder = (tmp_path / ".afqmc.lock.json").read_text(encoding="utf-8")
    finally:
        lock.release()
    assert "token123" not in holder and "https://user:***@example.org/x" in holder
