"""`python -m afqmc_dist.sweep`: Optuna studies whose trials are real training runs of the tool, shared by workers
through a real storage (SQLite here, PostgreSQL when its server binaries are installed), surviving a killed worker,
refusing a bad sweep file in one line, and reported by `python -m afqmc_dist.report SWEEP_DIR`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SAMPLE_DIR, fill_disk, free_port, last_error_line, limit, read_jsonl, snapshot

from afqmc_dist.errors import EXIT_STOPPED
from afqmc_dist.sweep.__main__ import main
from afqmc_dist.sweep.runs import run_seed
from afqmc_dist.tiny_model import build_tiny_bert, vocab_from_files

optuna = pytest.importorskip("optuna", reason="needs optuna, which is not installed")

QUICK = ROOT / "launch" / "sweeps" / "quick.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A random BERT with hidden size 32 and one layer whose vocabulary covers the sample data."""
    path = tmp_path_factory.mktemp("bert-h32")
    build_tiny_bert(str(path), vocab=vocab_from_files(sorted(str(p) for p in SAMPLE_DIR.glob("*.json"))),
                    hidden_size=32, num_layers=1, num_heads=2)
    return path


def quick_sweep(folder: Path, model: Path, **changes) -> Path:
    """launch/sweeps/quick.yaml made test-sized (the small model, one short epoch per run, a fast heartbeat),
    with `changes` on top (`base` and `search_space` are replaced whole when given); returns its path."""
    sweep = yaml.safe_load(QUICK.read_text(encoding="utf-8"))
    sweep["base"].update(model_checkpoint=str(model), num_train_epochs=1, max_train_samples=96, batch_size=16,
                         eval_steps=3, logging_steps=1, checkpointing_steps="2", cache_dir="none")
    sweep["search_space"] = {"learning_rate": sweep["search_space"]["learning_rate"],
                             "warmup_proportion": sweep["search_space"]["warmup_proportion"]}
    sweep.update(n_trials=3, heartbeat_interval=1, grace_period=3, pruner="none")
    for key, value in changes.items():
        if key == "base_update":
            sweep["base"].update(value)
        else:
            sweep[key] = value
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep), encoding="utf-8")
    return path


def sweep_command(sweep_file: Path, sweep_dir: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "afqmc_dist.sweep", str(sweep_file), "--output_dir", str(sweep_dir), *map(str, extra)]


def run(command: list[str], timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit(timeout))
    return result


def load(sweep_dir: Path, storage: str | None = None):
    name = json.loads((sweep_dir / "sweep.json").read_text())["study_name"]
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{sweep_dir / 'study.db'}")


def complete_trials(study) -> list:
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def check_each_trial_ran_once(sweep_dir: Path, study, seeds: list[int]) -> None:
    """Run folders and storage agree: one folder per complete trial, each seed run once, its value the trial's."""
    trials = complete_trials(study)
    assert sorted(p.name for p in (sweep_dir / "trials").iterdir()) == sorted(t.user_attrs["folder"].split("/")[-1]
                                                                             for t in trials)
    for trial in trials:
        folder = sweep_dir / trial.user_attrs["folder"]
        values = []
        for seed in seeds:
            log = (folder / f"seed-{seed}.log").read_text(encoding="utf-8")
            assert log.count("==== ") == 1, f"{folder}/seed-{seed} ran more than once"
            run_config = json.loads((folder / f"seed-{seed}" / "run_config.json").read_text())
            assert run_config["seed"] == seed
            assert {k: run_config[k] for k in trial.params} == trial.params
            values.append(json.loads((folder / f"seed-{seed}" / "results.json").read_text())["dev_accuracy"])
        assert trial.user_attrs["seed_values"] == {str(s): v for s, v in zip(seeds, values)}
        assert trial.value == pytest.approx(statistics.mean(values), abs=1e-12)
        assert trial.user_attrs["std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0, abs=1e-12)


# --- two local workers, the report, and the best configuration reproduced -------------------------------------

@pytest.fixture(scope="module")
def quick_study(small_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quick")
    sweep_dir = folder / "sweep"
    result = run(sweep_command(quick_sweep(folder, small_model), sweep_dir, "--workers", 2))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep_dir, result


def test_two_local_workers_finish_the_study_with_its_trial_count_and_run_each_trial_once(quick_study):
    sweep_dir, result = quick_study
    study = load(sweep_dir)
    assert len(complete_trials(study)) == 3
    # A trial dropped because the other worker took the last one first never ran: it has no folder.
    assert all(t.state == optuna.trial.TrialState.COMPLETE or "unneeded" in t.user_attrs for t in study.get_trials())
    check_each_trial_ran_once(sweep_dir, study, seeds=[1, 2])
    assert "[worker 1]" in result.stdout and "[worker 2]" in result.stdout


def test_the_report_ranks_the_trials_and_best_config_yaml_reproduces_the_best_run_exactly(quick_study, tmp_path):
    sweep_dir, _ = quick_study
    report = run([sys.executable, "-m", "afqmc_dist.report", str(sweep_dir)])
    assert report.returncode == 0, report.stderr[-3000:]
    study = load(sweep_dir)
    best = study.best_trial
    md = (sweep_dir / "sweep.md").read_text(encoding="utf-8")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in md.splitlines()
            if line.split("|")[1:2] and line.split("|")[1].strip().isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert rows[0][1] == str(int(best.user_attrs["folder"][-4:])) and rows[0][2] == "complete"
    means = [float(row[3].split("±")[0]) for row in rows]
    assert means == sorted(means, reverse=True) and means[0] == pytest.approx(best.value, abs=5e-5)
    assert f"python train.py {sweep_dir / 'best_config.yaml'}" in md
    assert (sweep_dir / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)

    # The file is train.py's own config file: run it as is, into its own folder.
    config = yaml.safe_load((sweep_dir / "best_config.yaml").read_text(encoding="utf-8"))
    assert config["seed"] == 1 and {k: config[k] for k in best.params} == best.params
    again = run([sys.executable, "train.py", str(sweep_dir / "best_config.yaml")])
    assert again.returncode == 0, again.stderr[-3000:]
    reproduced = json.loads((Path(config["output_dir"]) / "results.json").read_text())
    assert reproduced["dev_accuracy"] == best.user_attrs["seed_values"]["1"]
    original = json.loads((sweep_dir / best.user_attrs["folder"] / "seed-1" / "results.json").read_text())
    for key in ("best_step", "dev_accuracy", "dev_f1", "dev_precision", "dev_recall"):
        assert reproduced[key] == original[key], key
    # The workers ran with one thread each: sums in another order differ in the last digits.
    assert reproduced["dev_loss"] == pytest.approx(original["dev_loss"], abs=1e-6)


# --- a worker killed mid-trial ----------------------------------------------------------------------------------

def test_a_worker_killed_mid_trial_has_its_trial_resumed_by_the_next_run_of_the_same_command(small_model, tmp_path):
    sweep_file = quick_sweep(tmp_path, small_model, n_trials=2, seeds=[1])
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(sweep_file, sweep_dir)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_run = sweep_dir / "trials" / "0000" / "seed-1"
    deadline = time.time() + 120
    while not list((first_run / "checkpoints").glob("step_*")) and time.time() < deadline:
        time.sleep(0.02)
    assert list((first_run / "checkpoints").glob("step_*")), "the first trial never saved a checkpoint"
    worker.send_signal(signal.SIGKILL)  # the worker only: its run learns of it and saves a checkpoint (SIGTERM)
    worker.communicate(timeout=limit(30))
    killed_params = load(sweep_dir).get_trials()[0].params
    status_file = sweep_dir / "trials" / "0000" / "seed-1.status" / "rank0.json"
    deadline = time.time() + 60
    while not status_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert json.loads(status_file.read_text())["status"] == 3  # stopped by the signal, checkpoint saved

    again = run(command)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    study = load(sweep_dir)
    complete = complete_trials(study)
    assert len(complete) == 2
    assert killed_params in [t.params for t in complete]
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params == killed_params
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL  # failed as stale, then retried
    # The retry resumed the killed seed's checkpoint in the same folder instead of starting over.
    second_attempt = (first_run.parent / "seed-1.log").read_text(encoding="utf-8").split("==== ")[2]
    assert "resumed from" in second_attempt


def test_a_run_stopped_before_its_handlers_are_set_is_stopped_not_failed(small_model, tmp_path, monkeypatch):
    """The worker passes a stop signal on as soon as the run's process exists (`started`). One that lands in the
    interpreter's first moments, before the run can handle it, used to fail the trial ('the run was killed by
    SIGTERM', status 4) instead of queueing it again like any stopped run."""
    monkeypatch.chdir(ROOT)
    options = {**yaml.safe_load(quick_sweep(tmp_path, small_model).read_text())["base"], "seed": 1}
    folder = tmp_path / "trials" / "0000" / "seed-1"
    folder.parent.mkdir(parents=True)

    result = run_seed([sys.executable, "train.py"], options, str(folder), "accuracy", {}, {},
                      started=lambda process: process and process.send_signal(signal.SIGTERM))

    assert result.status == EXIT_STOPPED, result
    assert result.line.startswith("stopped: SIGTERM "), result
    assert not folder.exists(), "the run wrote nothing"


# --- bad sweep files --------------------------------------------------------------------------------------------

BAD_FILES = {
    "unknown_option": ({"base_update": {"learnin_rate": 1e-3}},
                       "base: learnin_rate: unknown option 'learnin_rate' (did you mean"),
    "low_above_high": ({"search_space": {"learning_rate": {"type": "float", "low": 1e-2, "high": 1e-3}}},
                       "search_space: learning_rate: low 0.01 > high 0.001: an empty range"),
    "empty_choices": ({"search_space": {"lr_scheduler_type": {"type": "categorical", "choices": []}}},
                      "search_space: lr_scheduler_type: choices: choices must be a non-empty list"),
    "choice_train_py_refuses": ({"search_space": {"lr_scheduler_type": ["linear", "cosine_warm"]}},
                                "search_space: lr_scheduler_type: choices: 'cosine_warm' is not one of"),
    "bad_launcher": ({"launcher": "accelerate-launch-nonexistent train.py"},
                     "launcher: accelerate-launch-nonexistent: no such program"),
    "missing_script": ({"launcher": "python no_such_train.py"}, "launcher: no_such_train.py: no such file"),
    "float_range_of_an_int_option": ({"search_space": {"eval_batch_size": {"type": "float", "low": 8, "high": 16}}},
                                     "search_space: eval_batch_size: type: --eval_batch_size takes int values"),
    "value_train_py_refuses": ({"search_space": {"learning_rate": [1e-3, 0.0]}},
                               "search_space: learning_rate: learning_rate = 0.0: --learning_rate must be > 0"),
    "set_by_the_sweep": ({"base_update": {"seed": 3}}, "base: seed: set by the sweep"),
    # Every trial used to fail on it in turn, after its start-up, and the sweep exited 0.
    "missing_model_folder": ({"base_update": {"model_checkpoint": "/nonexistent/tiny-model"}},
                             "base: model_checkpoint: --model_checkpoint /nonexistent/tiny-model: no such folder"),
    "unknown_key": ({"serach_space": {}}, "unknown key 'serach_space' (did you mean"),
    "too_many_grid_trials": ({"sampler": "grid", "n_trials": 5,
                              "search_space": {"gradient_accumulation_steps": [1, 2]}},
                             "n_trials: 5 is more than the grid's 2"),
    # Counted, not listed: this grid used to hang the check, then end in a MemoryError.
    "huge_grid": ({"sampler": "grid", "search_space": {
        name: {"type": "int", "low": 1, "high": 100_000}
        for name in ("length_group_size", "max_steps", "shuffle_buffer_size")}},
        "search_space: max_steps: the grid has more than 1000000 configurations"),
    # Accepted by TPESampler's constructor, it failed at the first trial (exit 4, study.db already written).
    "wrong_type_sampler_argument": ({"sampler": {"type": "tpe", "n_startup_trials": "x"}},
                                    "sampler: n_startup_trials: TPESampler: expected int, got 'x'"),
    "callable_sampler_argument": ({"sampler": {"type": "tpe", "gamma": 3}},
                                  "sampler: gamma: TPESampler: takes a Callable[[int], int] | None, which a sweep"),
    "huge_heartbeat": ({"heartbeat_interval": 10**20},  # an OverflowError in the heartbeat thread before
                       "heartbeat_interval: expected a whole number of seconds from 1 to 3600"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_sweep_file_is_one_error_line_naming_file_and_line_and_nothing_is_written(case, small_model, tmp_path,
                                                                                       capsys):
    changes, message = BAD_FILES[case]
    sweep_file = quick_sweep(tmp_path, small_model, **changes)
    sweep_dir = tmp_path / "sweep"
    assert main([str(sweep_file), "--output_dir", str(sweep_dir)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {sweep_file}:") and message in line, line
    assert line.split(":")[2].isdigit() or case == "unknown_key"  # the line of the offending key
    assert not sweep_dir.exists()


# --- a sweep folder and its study ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_sweep(small_model, tmp_path_factory):
    """A finished one-trial sweep: (its sweep file, its folder)."""
    folder = tmp_path_factory.mktemp("finished")
    sweep_file = quick_sweep(folder, small_model, n_trials=1, seeds=[1])
    result = run(sweep_command(sweep_file, folder / "sweep"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep_file, folder / "sweep"


def _empty_the_database(sweep_dir: Path) -> None:
    (sweep_dir / "study.db").write_bytes(b"")


def _delete_the_study(sweep_dir: Path) -> None:
    optuna.delete_study(study_name="quick", storage=f"sqlite:///{sweep_dir / 'study.db'}")


def _make_the_study_anew(sweep_dir: Path) -> None:
    _delete_the_study(sweep_dir)
    optuna.create_study(study_name="quick", storage=f"sqlite:///{sweep_dir / 'study.db'}", direction="maximize")


@pytest.mark.parametrize(("change", "message"), [
    (_empty_the_database, "its study.db is empty"),
    (_delete_the_study, "has no such study any more"),
    (_make_the_study_anew, "trials/0000 holds the runs of study 'quick' (id "),
], ids=["study.db emptied", "study deleted", "study made anew"])
def test_trial_folders_whose_study_is_gone_are_never_reused(change, message, finished_sweep, tmp_path, capsys):
    """Before, the rerun exited 0: the new trial 0 resumed the old trial 0's last checkpoint, trained no step and
    recorded the old result under the new parameters."""
    sweep_file, finished = finished_sweep
    sweep_dir = shutil.copytree(finished, tmp_path / "sweep")
    change(sweep_dir)
    trials_before = snapshot(sweep_dir / "trials")

    assert main([str(sweep_file), "--output_dir", str(sweep_dir)]) == 2

    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line and "use a new" in line, line
    assert snapshot(sweep_dir / "trials") == trials_before


def test_workers_started_together_and_a_rerun_draw_new_configurations(small_model, tmp_path):
    """`the same command on each machine` started at once on a new folder (before: the second died with an
    IntegrityError creating the storage), then the same command again with more trials (before: a seeded sampler
    proposed the same configurations again, 4 trials covering 2)."""
    sweep_dir = tmp_path / "sweep"
    space = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    first = sweep_command(quick_sweep(tmp_path, small_model, n_trials=4, seeds=[1], search_space=space,
                                      sampler={"type": "random", "seed": 0}), sweep_dir)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    together = [subprocess.Popen(first, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=limit(300))[0] for p in together]
    assert [p.returncode for p in together] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    (tmp_path / "more").mkdir()
    again = run(sweep_command(quick_sweep(tmp_path / "more", small_model, n_trials=6, seeds=[1], search_space=space,
                                          sampler={"type": "random", "seed": 0}), sweep_dir))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    trials = complete_trials(load(sweep_dir))
    assert len(trials) == 6
    assert len({t.params["learning_rate"] for t in trials}) == 6, [t.params for t in trials]
    # The first worker process draws with the file's seed (one worker repeats exactly); the others each with their own.
    assert sorted({t.user_attrs["sampler_seed"] for t in trials}) == [0, 1, 2]
    assert json.loads((sweep_dir / "workers.json").read_text()) == {"started": 3}


def test_the_workers_of_a_seeded_grid_take_each_point_once(small_model, tmp_path):
    """Optuna's GridSampler gives trial N the N-th point of the grid as its seed shuffles it: workers drawing with
    seeds of their own (before: S, S + 1) shuffled it each their way, and ran some points twice and others never."""
    from afqmc_dist.sweep.load import load_sweep
    from afqmc_dist.sweep.study import open_sweep

    sweep_dir = tmp_path / "sweep"
    space = {"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3], "warmup_proportion": [0.0, 0.1]}
    sweep_file = quick_sweep(tmp_path, small_model, n_trials=8, seeds=[1], search_space=space,
                             sampler={"type": "grid", "seed": 3})
    spec = load_sweep(str(sweep_file), str(sweep_dir))
    # Two worker processes' studies on one SQLite storage, taking trials in turn, as two workers do.
    workers = [open_sweep(spec, str(sweep_dir), None, worker=True)[1] for _ in range(2)]
    drawn = []

    def objective(trial) -> float:
        drawn.append(tuple(p.suggest(trial) for p in spec.space))
        return 0.5

    for number in range(8):
        workers[number % 2].optimize(objective, n_trials=1)
    assert sorted(drawn) == sorted((lr, warmup) for lr in space["learning_rate"]
                                   for warmup in space["warmup_proportion"])


def test_a_full_disk_ends_the_worker_in_one_line_and_the_same_command_continues_once_there_is_space(
        small_model, small_disk, tmp_path):
    """The disk under the sweep folder fills up while a trial trains. Before: ~90 lines of tracebacks from the
    heartbeat thread, `AssertionError: Should not reach`, exit 4, an empty error.log and a .tmp left."""
    sweep_dir = small_disk / "sweep"
    command = sweep_command(quick_sweep(tmp_path, small_model, n_trials=2, seeds=[1],
                                       base_update={"num_train_epochs": 3}), sweep_dir)
    worker = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_run = sweep_dir / "trials" / "0000" / "seed-1"
    deadline = time.time() + 120
    while not list(first_run.glob("checkpoints/step_*")) and time.time() < deadline and worker.poll() is None:
        time.sleep(0.02)
    ballast = fill_disk(small_disk)
    output = worker.communicate(timeout=limit(300))[0]

    assert worker.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "Should not reach" not in output
    line = last_error_line(output)
    assert "free on its disk" in line or "cannot be written" in line, line
    assert not list(sweep_dir.rglob("*.tmp")) and not (sweep_dir / "error.log").exists()

    ballast.unlink()
    again = run(command)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(complete_trials(load(sweep_dir))) == 2


def test_a_folder_holding_another_study_is_refused(small_model, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "notes.txt").write_text("mine")
    assert main([str(quick_sweep(tmp_path, small_model)), "--output_dir", str(sweep_dir)]) == 2
    assert "is not empty and not a sweep folder" in capsys.readouterr().err
    assert [p.name for p in sweep_dir.iterdir()] == ["notes.txt"]


def test_a_changed_sweep_file_is_refused_on_an_existing_study_and_nothing_changes(small_model, tmp_path, capsys):
    from afqmc_dist.sweep.load import load_sweep
    from afqmc_dist.sweep.study import open_sweep

    sweep_dir = tmp_path / "sweep"
    first = quick_sweep(tmp_path, small_model, seeds=[1, 2])
    open_sweep(load_sweep(str(first), str(sweep_dir)), str(sweep_dir), None, worker=False)
    before = {p.name: p.read_bytes() for p in sweep_dir.iterdir()}

    (tmp_path / "other").mkdir()
    changed = quick_sweep(tmp_path / "other", small_model, seeds=[1, 2, 3])
    assert main([str(changed), "--output_dir", str(sweep_dir)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        ("error: study 'quick' was made from a sweep file with another seeds ([1, 2]); use a new --output_dir (or "
        "study_name) for this one")]
    assert {p.name: p.read_bytes() for p in sweep_dir.iterdir()} == before


def test_the_ready_sweeps_are_valid_sweep_files(small_model, tmp_path):
    from afqmc_dist.sweep.load import load_sweep

    # Its model is made by `python -m afqmc_dist.tiny_model` first (README): a small model stands in for it.
    quick_file = yaml.safe_load(QUICK.read_text(encoding="utf-8"))
    quick_file["base"]["model_checkpoint"] = str(small_model)
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(quick_file), encoding="utf-8")
    quick = load_sweep(str(tmp_path / "quick.yaml"), str(tmp_path / "q"))
    assert quick.n_trials == 10 and quick.seeds == [1, 2] and quick.pruner["type"] == "median"
    # The BERT-base sweep needs the real data: checked with the sample files in their place.
    bert = yaml.safe_load((ROOT / "launch" / "sweeps" / "afqmc_bert_base.yaml").read_text(encoding="utf-8"))
    bert["base"].update(train_file=str(SAMPLE_DIR / "train.json"), dev_file=str(SAMPLE_DIR / "dev.json"))
    path = tmp_path / "bert.yaml"
    path.write_text(yaml.safe_dump(bert), encoding="utf-8")
    spec = load_sweep(str(path), str(tmp_path / "b"))
    grid = {p.name: p.grid_values() for p in spec.space}
    assert grid == {"learning_rate": [1e-5, 2e-5, 3e-5, 5e-5], "global_batch_size": [16, 32],
                    "num_train_epochs": [2, 3]}
    assert spec.n_trials == 16 and spec.seeds == [1, 2, 3]


# --- pruning: every rank of a 2-process trial stops at the same step --------------------------------------------

def test_a_hopeless_trial_is_pruned_before_its_last_evaluation_on_every_rank_at_the_same_step(small_model,
                                                                                              tmp_path):
    # Two processes through a plain `accelerate launch` (which exits 1 whatever its processes' statuses): the
    # worker reads each process's own status from the status folder.
    launcher = ("accelerate launch --config_file accelerate_config.yaml --multi_gpu --num_processes 2 "
                "--num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port $MAIN_PROCESS_PORT "
                "train.py")
    sweep_file = quick_sweep(tmp_path, small_model, n_trials=2, seeds=[1], launcher=launcher,
                             base_update={"eval_steps": 1}, search_space={"learning_rate": [1e-9]},
                             pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    sweep_dir = tmp_path / "sweep"
    from afqmc_dist.sweep.load import load_sweep
    from afqmc_dist.sweep.study import open_sweep

    # The study already holds a good trial (added through Optuna's own API, as a warm start would be): a dev
    # accuracy of 0.99 at every step. Learning rate 1e-9 learns nothing (train.py refuses 0).
    _, study, _ = open_sweep(load_sweep(str(sweep_file), str(sweep_dir)), str(sweep_dir), None, worker=False)
    study.add_trial(optuna.trial.create_trial(value=0.99, intermediate_values={step: 0.99 for step in range(40)}))

    result = run(sweep_command(sweep_file, sweep_dir), env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (pruned,) = [t for t in load(sweep_dir).get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned.params == {"learning_rate": 1e-9} and list(pruned.intermediate_values) == [1]
    run_dir = sweep_dir / pruned.user_attrs["folder"] / "seed-1"
    assert json.loads((run_dir / "run_config.json").read_text())["num_processes"] == 2
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "dev/accuracy" in r] == [1]  # of the 3 evaluations planned
    assert max(r["step"] for r in records) == 1  # no step trained after it
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir.parent / "seed-1.status").glob("rank*.json"))]
    # Both processes ended as pruned (a rank still training would have waited in a collective, then failed).
    assert [(r["rank"], r["status"]) for r in ranks] == [(0, 5), (1, 5)]
    assert "pruned at step 1" in ranks[0]["line"] and "pruned at step 1" in pruned.user_attrs["pruned"]


# --- PostgreSQL: workers on "many machines" share one study ----------------------------------------------------

def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (initdb + pg_ctl in a temporary folder, as the `postgres` user
    when the tests run as root); yields its URL and stops it."""
    pg = _postgres_bin()
    if pg is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    if not any(importlib.util.find_spec(driver) for driver in ("psycopg", "psycopg2")):
        pytest.skip("needs psycopg or psycopg2 (a PostgreSQL driver), which is not installed")
    data = Path(tempfile.mkdtemp(prefix="afqmc-pg-"))  # not under pytest's folders: those are private to root
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run([*as_user, str(pg / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True, timeout=limit(120))
    subprocess.run([*as_user, str(pg / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-o",
                    f"-p {port} -k {data} -h 127.0.0.1", "start"], check=True, capture_output=True, timeout=limit(120))
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # as the README writes it: no driver named
    finally:
        subprocess.run([*as_user, str(pg / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=limit(120))
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_started_separately_share_a_postgresql_study(postgres, small_model, tmp_path):
    sweep_file = quick_sweep(tmp_path, small_model, n_trials=2, seeds=[1])
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(sweep_file, sweep_dir, "--storage", postgres)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)
    second = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    outputs = [p.communicate(timeout=limit(240))[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    study = load(sweep_dir, postgres)
    assert len(complete_trials(study)) == 2
    check_each_trial_ran_once(sweep_dir, study, seeds=[1])
    assert not (sweep_dir / "study.db").exists()  # the study is in the server, not beside the trials
    # Each worker ran one of the two trials.
    assert [len(re.findall(r"^trial \d+: dev_accuracy", o, re.MULTILINE)) for o in outputs] == [1, 1], outputs

