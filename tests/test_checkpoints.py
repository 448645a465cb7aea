"""Checkpoints, resume and preemption: a run that is killed and resumed ends exactly where an uninterrupted one
does (same weights, same dev metrics, same metrics.jsonl), on one process and on two."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import (
    fill_disk,
    flip_byte,
    history,
    kill_tree,
    last_error_line,
    limit,
    read_jsonl,
    run_tool,
    snapshot,
    start_tool,
    without_timing,
)
from safetensors.torch import load_file

from afqmc_dist.checkpoints import (
    TrainState,
    check_free_space,
    checkpoint_problem,
    find_latest_checkpoint,
    save_checkpoint,
)
from afqmc_dist.cli import main
from afqmc_dist.errors import UserError
from afqmc_dist.preemption import StopRequests

# 512 pairs in batches of 16: 32 optimizer steps per epoch, 64 in all. Checkpoints every 16 steps land in the
# middle of epoch 1 (16), at the end of epoch 1 before its evaluation (32), in the middle of epoch 2 (48), and at
# the end (64). Logging every 10 and evaluating every 12 steps keep a partial loss window in every checkpoint.
STEPS = 64


def run_args(model, data, out, *extra) -> list:
    return ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"],
            "--output_dir", out, "--do_train", "--learning_rate", "1e-3", "--num_train_epochs", "2",
            "--batch_size", "16", "--logging_steps", "10", "--eval_steps", "12", "--checkpointing_steps", "16",
            "--seed", "7", *extra]


@pytest.fixture(scope="module")
def reference(tiny_model, synthetic_data, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce (dropout on, CPU, fixed seed)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_tool(run_args(tiny_model, synthetic_data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def wait_for(path: Path, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_same_run(expected: Path, actual: Path) -> None:
    """Final weights bit for bit, best model, best dev metrics and the whole metrics history."""
    for folder in (f"checkpoints/step_{STEPS}", "best"):
        want, got = tensors(expected / folder), tensors(actual / folder)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), f"{folder} differs"
    results = [without_timing([json.loads((out / "results.json").read_text())]) for out in (expected, actual)]
    assert results[0] == results[1]
    metrics = [without_timing(read_jsonl(out / "metrics.jsonl")) for out in (expected, actual)]
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize("last_checkpoint", [16, 32, 48], ids=["mid-epoch-1", "epoch-boundary", "mid-epoch-2"])
def test_run_killed_with_sigkill_resumes_bit_exact(reference, tiny_model, synthetic_data, tmp_path, last_checkpoint):
    out = tmp_path / "out"
    run = start_tool(run_args(tiny_model, synthetic_data, out))
    wait_for(out / "checkpoints" / f"step_{last_checkpoint}", run)
    kill_tree(run.pid)  # SIGKILL: no handler, no clean-up, what a dead node looks like
    run.communicate()
    assert run.returncode == -signal.SIGKILL
    assert find_latest_checkpoint(str(out)).endswith(f"step_{last_checkpoint}")

    resumed = run_tool(run_args(tiny_model, synthetic_data, out, "--resume_from_checkpoint", "latest"))

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{last_checkpoint}'}: step {last_checkpoint}" in resumed.stdout
    assert_same_run(reference, out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_finishes_the_step_saves_and_exits_3(reference, tiny_model, synthetic_data, tmp_path, sig):
    """What SLURM (SIGUSR1 / SIGTERM before a kill) and Ctrl-C (SIGINT) do: stop after the current step with a
    checkpoint of that step; the resumed run ends exactly like the uninterrupted one."""
    out = tmp_path / "out"
    run = start_tool(run_args(tiny_model, synthetic_data, out, "--checkpointing_steps", "1000"))
    wait_for(out / "metrics.jsonl", run)  # training has started (the first log is at step 10)
    sent = time.monotonic()
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=limit(60))
    took = time.monotonic() - sent

    assert run.returncode == 3, stderr[-3000:]
    assert took < 20, "one step (tens of ms) plus one checkpoint (a fraction of a second), with start-up slack"
    (stopped_line,) = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert f"{sig.name} received: stopped after step" in stopped_line
    (checkpoint,) = (out / "checkpoints").iterdir()
    step = int(checkpoint.name.removeprefix("step_"))
    assert f"after step {step} and saved {checkpoint}" in stopped_line
    assert 10 <= step < STEPS
    if sig != signal.SIGTERM:
        return
    resumed = run_tool(run_args(tiny_model, synthetic_data, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, out)


def test_first_ctrl_c_asks_to_stop_the_second_quits_at_once(fresh_accelerate_state):
    with StopRequests(Accelerator(cpu=True)) as requests, requests.deferred():
        assert requests.requested() is None
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
        assert requests.requested() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_two_process_run_killed_mid_epoch_resumes_bit_exact(tiny_model, synthetic_data, tmp_path):
    """The same on 2 processes (accelerate launch, gloo): 16 steps per epoch, checkpoint at step 12, resumed
    across the epoch boundary. Each process restores its own RNG streams and its own partial loss window."""
    def args(out, *extra):
        return run_args(tiny_model, synthetic_data, out, "--checkpointing_steps", "12", "--eval_steps", "5", *extra)

    reference = tmp_path / "reference"
    result = run_tool(args(reference), script="cpu_debug_2proc.sh")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    run = start_tool(args(out), script="cpu_debug_2proc.sh")
    wait_for(out / "checkpoints" / "step_12", run)
    kill_tree(run.pid)
    run.communicate()
    assert sorted(p.name for p in (out / "checkpoints" / "step_12").iterdir() if p.name.startswith("random")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]

    resumed = run_tool(args(out, "--resume_from_checkpoint", "latest"), script="cpu_debug_2proc.sh")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 12, epoch 1" in resumed.stdout
    for folder in ("checkpoints/step_24", "checkpoints/step_32", "best"):
        want, got = tensors(reference / folder), tensors(out / folder)
        assert all(torch.equal(want[k], got[k]) for k in want), folder
    assert without_timing(read_jsonl(out / "metrics.jsonl")) == without_timing(read_jsonl(reference / "metrics.jsonl"))


def test_early_stopping_stops_every_process_at_the_same_step(tiny_model, synthetic_data, tmp_path):
    """Patience 2 with an impossible threshold (+0.5 accuracy): evaluations at steps 4, 8, 12, then stop. Had one
    process gone on, the other would wait at its next collective and the launch would hang."""
    out = tmp_path / "out"
    result = run_tool(["--model_checkpoint", tiny_model, "--train_file", synthetic_data["train"], "--dev_file",
                       synthetic_data["dev"], "--output_dir", out, "--do_train", "--learning_rate", "1e-3",
                       "--num_train_epochs", "8", "--batch_size", "16", "--eval_steps", "4",
                       "--early_stopping_patience", "2", "--early_stopping_threshold", "0.5",
                       "--checkpointing_steps", "epoch"], script="cpu_debug_2proc.sh", timeout=limit(300))

    assert result.returncode == 0, result.stderr[-3000:]
    assert "early stopping at step 12" in result.stdout
    evaluations = history(out)
    assert [r["step"] for r in evaluations] == [4, 8, 12]
    best = max(evaluations, key=lambda r: r["accuracy"])
    results = json.loads((out / "results.json").read_text())
    assert (results["best_step"], results["dev_accuracy"]) == (best["step"], best["accuracy"])
    # The final checkpoint is written after a barrier that both processes reached at step 12.
    (final,) = (out / "checkpoints").iterdir()
    assert final.name == "step_12" and (final / "random_states_1.pkl").exists()
    assert json.loads((final / "train_state.json").read_text())["step"] == 12


# --- incomplete and incompatible checkpoints ------------------------------------------------------------------


@pytest.fixture
def copied_run(reference, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


@pytest.mark.parametrize("cut", ["truncated weights", "no train_state.json", "a missing file", "no checksums"])
def test_checkpoint_cut_short_is_never_taken_for_latest(copied_run, cut):
    newest = copied_run / "checkpoints" / f"step_{STEPS}"
    if cut == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif cut == "no train_state.json":
        (newest / "train_state.json").unlink()
    elif cut == "no checksums":
        (newest / "checksums.sha256").unlink()  # the last file a save writes
    else:
        (newest / "optimizer.bin").unlink()
    shutil.copytree(newest, copied_run / "checkpoints" / "step_80.tmp")  # a save killed before its rename

    assert find_latest_checkpoint(str(copied_run)) == str(copied_run / "checkpoints" / "step_48")


def test_resuming_from_a_named_incomplete_checkpoint_is_refused(copied_run, synthetic_data, tiny_model, capsys,
                                                                fresh_accelerate_state):
    newest = copied_run / "checkpoints" / f"step_{STEPS}"
    (newest / "optimizer.bin").write_bytes(b"")

    assert main([str(a) for a in run_args(tiny_model, synthetic_data, copied_run,
                                          "--resume_from_checkpoint", newest)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --resume_from_checkpoint {newest}: not a usable checkpoint: "
                            "optimizer.bin (0 bytes) does not match its checksum")
    assert "\n" not in error


@pytest.mark.parametrize(("change", "field"), [(["--batch_size", "8"], "global_batch_size"),
                                               (["--max_seq_length", "64"], "max_seq_length"),
                                               (["--seed", "8"], "seed")])
def test_resuming_with_other_settings_is_refused_naming_the_field(copied_run, synthetic_data, tiny_model, capsys,
                                                                 fresh_accelerate_state, change, field):
    metrics_before = (copied_run / "metrics.jsonl").read_bytes()

    assert main([str(a) for a in run_args(tiny_model, synthetic_data, copied_run, "--resume_from_checkpoint",
                                          "latest", *change)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --resume_from_checkpoint {copied_run / 'checkpoints' / f'step_{STEPS}'}: "
                            f"{field} differs from the checkpoint's")
    assert (copied_run / "metrics.jsonl").read_bytes() == metrics_before  # nothing touched


def test_resuming_with_another_model_is_refused(copied_run, synthetic_data, tiny_model, tmp_path, capsys,
                                                fresh_accelerate_state):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)

    assert main([str(a) for a in run_args(other, synthetic_data, copied_run, "--resume_from_checkpoint",
                                          "latest")]) == 2
    assert "model_checkpoint differs from the checkpoint's" in capsys.readouterr().err


def test_resuming_with_other_training_data_is_refused(copied_run, synthetic_data, tiny_model, tmp_path, capsys,
                                                      fresh_accelerate_state):
    data = {**synthetic_data, "train": tmp_path / "train.json"}
    lines = Path(synthetic_data["train"]).read_text(encoding="utf-8").splitlines(keepends=True)
    data["train"].write_text("".join(reversed(lines)), encoding="utf-8")  # same pairs, other order

    assert main([str(a) for a in run_args(tiny_model, data, copied_run, "--resume_from_checkpoint", "latest")]) == 2
    assert "train_file differs from the checkpoint's (content:" in capsys.readouterr().err


def test_latest_with_no_checkpoint_starts_afresh(tiny_model, synthetic_data, tmp_path, capsys, fresh_accelerate_state):
    """A requeued job always passes --resume_from_checkpoint latest, including the first time it runs."""
    out = tmp_path / "out"
    assert main([str(a) for a in run_args(tiny_model, synthetic_data, out, "--resume_from_checkpoint", "latest",
                                          "--num_train_epochs", "1", "--max_train_samples", "64")]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert (out / "best").is_dir()


def test_save_total_limit_keeps_the_newest_checkpoints_and_the_best_model(tiny_model, synthetic_data, tmp_path,
                                                                         fresh_accelerate_state):
    out = tmp_path / "out"
    assert main([str(a) for a in run_args(tiny_model, synthetic_data, out, "--checkpointing_steps", "4",
                                          "--save_total_limit", "2", "--num_train_epochs", "1")]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_28", "step_32"]
    assert (out / "best" / "model.safetensors").exists()


# --- a loss that blows up; the disk ----------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model, synthetic_data, tmp_path):
    """A learning rate of 1e30 makes the weights overflow to inf after the first update: the loss of step 2 is
    NaN. The run stops with exit 1, names the step, and writes no checkpoint from after it."""
    out = tmp_path / "out"
    result = run_tool(run_args(tiny_model, synthetic_data, out, "--learning_rate", "1e30", "--checkpointing_steps",
                               "1", "--logging_steps", "3", "--max_grad_norm", "0"))

    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("stopped: ")]
    bad_step = int(line.split("NaN/inf at step ")[1].split(";")[0])
    assert 1 <= bad_step <= 3
    saved = sorted(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").iterdir())
    assert saved == list(range(1, bad_step))  # every step before the bad one, none after
    for step in saved:
        assert all(torch.isfinite(t).all() for t in tensors(out / "checkpoints" / f"step_{step}").values())


def test_skip_nonfinite_loss_keeps_training(tiny_model, synthetic_data, tmp_path, fresh_accelerate_state):
    out = tmp_path / "out"
    assert main([str(a) for a in run_args(tiny_model, synthetic_data, out, "--learning_rate", "1e30",
                                          "--num_train_epochs", "1", "--skip_nonfinite_loss")]) == 0
    assert (out / "best").is_dir()


def test_too_little_free_disk_is_one_clear_error(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_free_space(str(tmp_path / "new" / "out"), needed=1)
    with pytest.raises(UserError, match=r"--output_dir .*: \d+ MiB free on its disk, but a checkpoint and the best "
                                        r"model need about \d+ MiB"):
        check_free_space(str(tmp_path / "out"), needed=free + (1 << 40))


# --- checksums: a damaged checkpoint is never resumed from -----------------------------------------------------

CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "train_state.json",
                    "metrics.jsonl", "checksums.sha256"]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_one_changed_byte_in_any_file_makes_latest_skip_the_checkpoint_and_say_why(copied_run, name):
    newest = copied_run / "checkpoints" / f"step_{STEPS}"
    assert sorted(p.name for p in newest.iterdir()) == sorted(CHECKPOINT_FILES)  # every file is covered
    flip_byte(newest / name)
    said = []

    assert find_latest_checkpoint(str(copied_run), say=said.append) == str(copied_run / "checkpoints" / "step_48")
    (line,) = said
    assert line.startswith(f"--resume_from_checkpoint latest: skipping {newest}: ")
    assert name in line or "checksums.sha256" in line


def test_resuming_after_a_damaged_newest_checkpoint_ends_bit_identical(reference, copied_run, tiny_model,
                                                                      synthetic_data):
    """A stray write in the newest checkpoint's weights, same size: `latest` takes the one before, and the run
    continues from there to exactly the uninterrupted run's end."""
    flip_byte(copied_run / "checkpoints" / f"step_{STEPS}" / "model.safetensors")

    resumed = run_tool(run_args(tiny_model, synthetic_data, copied_run, "--resume_from_checkpoint", "latest"))

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping {copied_run / 'checkpoints' / f'step_{STEPS}'}: model.safetensors" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step 48" in resumed.stdout
    assert_same_run(reference, copied_run)


def test_latest_refuses_when_every_checkpoint_is_damaged_and_changes_nothing(copied_run, tiny_model, synthetic_data,
                                                                             capsys, fresh_accelerate_state):
    """What once wiped a run: no usable checkpoint used to mean 'starting afresh', which replaced best/ and
    deleted the checkpoints. Now it is one line naming each checkpoint and why, and the folder stays as it was."""
    for checkpoint in (copied_run / "checkpoints").iterdir():
        flip_byte(checkpoint / "optimizer.bin")
    before = snapshot(copied_run)

    status = main([str(a) for a in run_args(tiny_model, synthetic_data, copied_run, "--resume_from_checkpoint",
                                            "latest")])

    assert status == 2
    error = last_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: --resume_from_checkpoint latest: none of the 4 checkpoint(s) in "
                            f"{copied_run / 'checkpoints'} is usable: step_64 (optimizer.bin")
    assert all(f"step_{step} (optimizer.bin" in error for step in (16, 32, 48, 64))
    assert snapshot(copied_run) == before


def test_a_named_damaged_checkpoint_is_refused_in_one_line(copied_run, tiny_model, synthetic_data, capsys,
                                                           fresh_accelerate_state):
    checkpoint = copied_run / "checkpoints" / "step_48"
    flip_byte(checkpoint / "random_states_0.pkl")

    assert main([str(a) for a in run_args(tiny_model, synthetic_data, copied_run, "--resume_from_checkpoint",
                                          checkpoint)]) == 2
    assert last_error_line(capsys.readouterr().err) == (
        f"error: --resume_from_checkpoint {checkpoint}: not a usable checkpoint: random_states_0.pkl "
        f"({(checkpoint / 'random_states_0.pkl').stat().st_size} bytes) does not match its checksum (damaged or cut "
        "short)")


@pytest.mark.parametrize("value", ['"abc"', "-3", "[]"])
def test_a_train_state_of_the_wrong_shape_makes_the_checkpoint_unusable(copied_run, value):
    """Even with matching checksums (a bug that wrote it so): the loop's position must be counts."""
    from afqmc_dist.manifest import write_manifest

    newest = copied_run / "checkpoints" / f"step_{STEPS}"
    state = json.loads((newest / "train_state.json").read_text())
    (newest / "train_state.json").write_text(json.dumps(state).replace(f'"step": {STEPS}', f'"step": {value}'))
    write_manifest(str(newest))

    assert checkpoint_problem(str(newest)).startswith('train_state.json: "step" is ')


def sharded_style_save(output_dir: Path) -> Path:
    """A checkpoint written the way accelerate writes FSDP's SHARDED_STATE_DICT: the model and the optimizer as
    folders of torch.distributed.checkpoint files (a save-state hook writes them, as accelerate's FSDP path does)."""
    import torch.distributed.checkpoint as dcp

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model.train()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    model, optimizer = accelerator.prepare(model, optimizer)

    def as_shards(models, weights, folder):
        dcp.save({"model": model.state_dict()}, checkpoint_id=f"{folder}/pytorch_model_fsdp_0")
        dcp.save({"optimizer": optimizer.state_dict()}, checkpoint_id=f"{folder}/optimizer_0")
        weights.clear()  # the sharded folders replace the whole-model file

    accelerator.register_save_state_pre_hook(as_shards)
    return Path(save_checkpoint(accelerator, str(output_dir), TrainState(step=5)))


def test_a_checkpoint_whose_model_and_optimizer_are_folders_is_complete_and_checked_file_by_file(
        tmp_path, fresh_accelerate_state):
    """FSDP/DeepSpeed save folders, not files: a completeness check that looked only at files never found such
    a checkpoint complete, `latest` started afresh, and the fresh start deleted the run."""
    checkpoint = sharded_style_save(tmp_path / "out")
    shard_files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*.distcp"))
    listed = (checkpoint / "checksums.sha256").read_text()

    assert any(f.startswith("pytorch_model_fsdp_0/") for f in shard_files)
    assert any(f.startswith("optimizer_0/") for f in shard_files)
    assert all(f"  {f}\n" in listed for f in shard_files)
    assert checkpoint_problem(str(checkpoint)) is None
    assert find_latest_checkpoint(str(tmp_path / "out")) == str(checkpoint)

    flip_byte(checkpoint / shard_files[0])
    assert checkpoint_problem(str(checkpoint)).startswith(f"{shard_files[0]} (")
    (checkpoint / shard_files[0]).unlink()
    assert checkpoint_problem(str(checkpoint)) == f"{shard_files[0]} is missing"


def test_a_garbage_rng_state_is_refused_rather_than_silently_ignored(tmp_path, fresh_accelerate_state):
    """accelerate's load_state logs a random-state file it cannot read at info level and goes on: the resumed run
    would quietly stop being exact. The tool compares what was restored with what the file holds."""
    from afqmc_dist.resume import check_rng_restored

    accelerator = Accelerator(cpu=True)
    accelerator.save_state(str(tmp_path / "state"))
    (tmp_path / "state" / "random_states_0.pkl").write_bytes(b"not a pickle of random states")
    accelerator.load_state(str(tmp_path / "state"))  # no error: that is the problem

    with pytest.raises(UserError, match="random_states_0.pkl cannot be read .*would not be exact"):
        check_rng_restored(accelerator, str(tmp_path / "state"))


# --- a full disk, and Ctrl-C twice, while a checkpoint is being saved --------------------------------------------


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_run_resumes_exactly_once_space_is_freed(
        tiny_model, synthetic_data, small_disk, tmp_path):
    """The disk fills up between two checkpoints (the run is paused with SIGSTOP while a ballast file takes the
    space): the next save fails. One error line naming the folder and the free space, no `.tmp` left to keep the
    disk full, the earlier checkpoints intact; after freeing the space, `latest` continues to exactly the end of
    an uninterrupted run."""
    def args(out, *extra):
        return run_args(tiny_model, synthetic_data, out, "--checkpointing_steps", "2", "--eval_steps", "1000",
                        "--logging_steps", "1000", *extra)

    reference = tmp_path / "reference"
    assert run_tool(args(reference)).returncode == 0
    out = small_disk / "out"
    run = start_tool(args(out))
    wait_for(out / "checkpoints" / "step_4", run)
    run.send_signal(signal.SIGSTOP)
    ballast = fill_disk(small_disk, leave_bytes=200_000)  # less than a checkpoint (about 1.5 MB)
    run.send_signal(signal.SIGCONT)
    _, stderr = run.communicate(timeout=limit(300))

    assert run.returncode == 2, stderr[-3000:]
    error = last_error_line(stderr)
    assert error.startswith(f"error: cannot save the checkpoint {out / 'checkpoints'}/step_")
    assert "MiB free on its disk" in error and "the partial folder was removed" in error
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert all(checkpoint_problem(str(p)) is None for p in (out / "checkpoints").iterdir())

    ballast.unlink()
    resumed = run_tool(args(out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, out)


def test_a_second_ctrl_c_during_a_checkpoint_save_quits_at_once_and_removes_the_partial_folder(
        tmp_path, fresh_accelerate_state):
    """Ctrl-C twice while `step_5.tmp` is being written (real SIGINTs, sent from inside the save through
    accelerate's save-state hook, so that they land there whatever the machine's speed): the first only asks to
    stop, the second quits at once (KeyboardInterrupt: exit status 130, see test_errors.py), and the partial folder
    does not stay behind; the earlier checkpoint is intact."""
    accelerator = Accelerator(cpu=True)
    layer = torch.nn.Linear(4, 2)
    accelerator.prepare(layer, torch.optim.AdamW(layer.parameters()))  # a model and optimizer to save
    out = tmp_path / "out"
    earlier = save_checkpoint(accelerator, str(out), TrainState(step=4))
    interrupted = []

    def ctrl_c_twice(models, weights, folder):
        interrupted.append(folder)
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the save goes on
        os.kill(os.getpid(), signal.SIGINT)  # the second: KeyboardInterrupt, here, inside save_state

    accelerator.register_save_state_pre_hook(ctrl_c_twice)
    with StopRequests(accelerator) as requests, requests.deferred(), pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(out), TrainState(step=5))

    assert interrupted == [str(out / "checkpoints" / "step_5.tmp")]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4"]
    assert checkpoint_problem(earlier) is None
