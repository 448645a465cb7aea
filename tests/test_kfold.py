"""`python -m afqmc_dist.kfold`: K real training runs of the tool (train.py through the sweep's launcher) on
stratified folds of a training file, killed with kill -9 mid-run and continued, then checked: the folds, the
out-of-fold predictions against each fold model's own predictions, cv.md against the folds' results.json, and the
ensemble; bad input refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import (
    ROOT,
    kill_tree,
    last_error_line,
    limit,
    plain_hf_predict,
    read_jsonl,
    requires,
    snapshot,
    synthetic_pairs,
    write_jsonl,
)

from afqmc_dist.kfold.__main__ import main
from afqmc_dist.kfold.folds import assign_folds

FOLDS, SEED = 3, 42
PAIRS, EPOCHS, BATCH = 90, 2, 8
STEPS = EPOCHS * -(-PAIRS * (FOLDS - 1) // FOLDS // BATCH)  # each fold run's optimizer steps (16)
RUN = f"seed-{SEED}"
PREDICTED = ("pred_label", "pred_prob", "fold")
needs_optuna = requires("optuna")  # every k-fold that runs


def write_config(folder: Path, model: Path, train: Path, **changes) -> Path:
    """train.py's config file for short runs of the tiny model (a checkpoint every 3 steps, to resume from)."""
    config = {"model_checkpoint": str(model), "train_file": str(train), "num_train_epochs": EPOCHS, "batch_size": BATCH,
              "max_seq_length": 32, "learning_rate": 1e-3, "checkpointing_steps": "3", "cache_dir": "none",
              "logging_steps": 4, **changes}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}), encoding="utf-8")
    return path


def kfold_command(config: Path, output_dir: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "afqmc_dist.kfold", str(config), "--folds", str(FOLDS), "--output_dir",
            str(output_dir), "--heartbeat_interval", "1", "--grace_period", "3", *map(str, extra)]


ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONFAULTHANDLER": "1"}


def trial_states(output_dir: Path) -> dict[int, str]:
    """Trial number -> state, read from the study's SQLite file directly (no Optuna in the test process)."""
    database = output_dir / "runs" / "study.db"
    if not database.exists():
        return {}
    try:
        with sqlite3.connect(database, timeout=10) as db:
            return dict(db.execute("SELECT number, state FROM trials"))
    except sqlite3.OperationalError:  # the tables are being made
        return {}


def fold_of_run(run_yaml: Path) -> int:
    """The fold a run belongs to, from its options: its dev file is folds/fold-K/dev.json."""
    dev = yaml.safe_load(run_yaml.read_text(encoding="utf-8"))["dev_file"]
    return int(re.search(r"fold-(\d+)", dev).group(1))


def fold_runs(output_dir: Path) -> dict[int, Path]:
    """Fold -> its run folder (D/runs/trials/NNNN/seed-S), from the runs' own options."""
    return {fold_of_run(path): path.with_suffix("") for path in (output_dir / "runs" / "trials").glob(f"*/{RUN}.yaml")}


# --- a k-fold killed with kill -9 mid-run, then continued by the same command ---------------------------------

@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("kfold")
    train = write_jsonl(folder / "train.json", synthetic_pairs(PAIRS, seed=11))
    return {"folder": folder, "train": train, "config": write_config(folder, tiny_model, train)}


def checkpoint_steps(run: Path) -> list[int]:
    """The steps of a run's complete checkpoints (one being written is step_N.tmp)."""
    names = [p.name.removeprefix("step_") for p in (run / "checkpoints").glob("step_*")]
    return sorted(int(name) for name in names if name.isdigit())


def mid_training(output_dir: Path) -> set[int]:
    """The folds whose run has saved a checkpoint and has not reached its last step."""
    return {fold for fold, run in fold_runs(output_dir).items()
            if checkpoint_steps(run) and checkpoint_steps(run)[-1] < STEPS and not Path(f"{run}.json").exists()}


@pytest.fixture(scope="module")
def killed_and_continued(data):
    """The k-fold with 2 workers, killed (kill -9, the whole process tree) once a fold is complete in the study and
    another is mid-training with a checkpoint, then run again to its end. Returns what was there at the kill, and
    the rerun."""
    output_dir = data["folder"] / "D"
    command = kfold_command(data["config"], output_dir, "--workers", 2)
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + limit(150)
        while time.time() < deadline and first.poll() is None:
            if "COMPLETE" in trial_states(output_dir).values() and mid_training(output_dir):
                break
            time.sleep(0.05)
    finally:
        kill_tree(first.pid, signal.SIGKILL)
    out, _ = first.communicate(timeout=limit(30))
    assert first.returncode == -signal.SIGKILL, f"the k-fold ended before it could be killed:\n{out[-3000:]}"
    runs = fold_runs(output_dir)
    complete = {fold_of_run(output_dir / "runs" / "trials" / f"{number:04d}" / f"{RUN}.yaml")
                for number, state in trial_states(output_dir).items() if state == "COMPLETE"}
    before = {"complete": complete, "mid_training": mid_training(output_dir),
              "snapshots": {f: snapshot(runs[f] / "best") for f in complete},
              "mtimes": {f: (runs[f] / "results.json").stat().st_mtime_ns for f in complete}}
    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=limit(240))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return output_dir, before, again


@needs_optuna
def test_a_killed_kfold_continues_without_running_its_completed_folds_again(killed_and_continued):
    output_dir, before, again = killed_and_continued
    assert before["complete"] and before["mid_training"], before
    runs = fold_runs(output_dir)
    for fold in before["complete"]:  # kept: not one byte of its model or results written again
        assert snapshot(runs[fold] / "best") == before["snapshots"][fold]
        assert (runs[fold] / "results.json").stat().st_mtime_ns == before["mtimes"][fold]
        assert Path(f"{runs[fold]}.log").read_text(encoding="utf-8").count("==== ") == 1
    for fold in before["mid_training"]:  # run again, from the checkpoint the killed run left mid-training
        attempts = Path(f"{runs[fold]}.log").read_text(encoding="utf-8").split("==== ")[1:]
        resumed = re.search(r"resumed from \S+/checkpoints/step_(\d+)", attempts[-1])
        assert len(attempts) == 2 and resumed and 0 < int(resumed.group(1)) < STEPS, attempts[-1][-2000:]
    last = again.stdout.strip().splitlines()[-1]
    kept = len(before["complete"])
    assert last.startswith(f"k-fold done: {FOLDS} folds ({kept} kept from an earlier run, {FOLDS - kept} run now)")
    assert "[worker 1]" in again.stdout and "[worker 2]" in again.stdout


# --- the folds ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("labels", "folds"), [([0] * 37 + [1] * 53, 3), ([0, 1, 1, 2, 2, 2, 0, 1] * 13, 5),
                                               ([1] * 7 + [0] * 100, 7)])
def test_dev_folds_are_disjoint_cover_every_pair_keep_the_label_ratio_and_repeat_for_a_seed(labels, folds):
    fold_of = assign_folds(labels, folds, seed=3)
    assert sorted(set(fold_of)) == list(range(folds))  # each pair in exactly one dev fold, no fold empty
    for label, count in Counter(labels).items():
        per_fold = Counter(f for f, value in zip(fold_of, labels) if value == label)
        assert {per_fold[k] for k in range(folds)} <= {count // folds, -(-count // folds)}, (label, per_fold)
    sizes = Counter(fold_of)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert assign_folds(labels, folds, seed=3) == fold_of
    assert assign_folds(labels, folds, seed=4) != fold_of


@needs_optuna
def test_the_fold_files_in_d_are_the_seeded_stratified_folds_of_the_training_file(killed_and_continued, data):
    output_dir, _, _ = killed_and_continued
    rows = read_jsonl(data["train"])
    fold_of = assign_folds([int(r["label"]) for r in rows], FOLDS, SEED)
    summary = json.loads((output_dir / "folds.json").read_text(encoding="utf-8"))
    assert summary["folds"] == FOLDS and summary["seed"] == SEED and summary["pairs"] == len(rows)
    for k in range(FOLDS):
        folder = output_dir / "folds" / f"fold-{k}"
        assert read_jsonl(folder / "dev.json") == [r for r, f in zip(rows, fold_of) if f == k]
        assert read_jsonl(folder / "train.json") == [r for r, f in zip(rows, fold_of) if f != k]
        dev_labels = Counter(r["label"] for r, f in zip(rows, fold_of) if f == k)
        assert summary["per_fold"][k]["dev_labels"] == dict(sorted(dev_labels.items()))


# --- out-of-fold predictions, cv.md, the ensemble --------------------------------------------------------------

@needs_optuna
def test_oof_predictions_cover_every_pair_once_as_its_own_fold_model_predicts_it(killed_and_continued, data):
    output_dir, _, _ = killed_and_continued
    rows = read_jsonl(data["train"])
    oof = read_jsonl(output_dir / "oof_predictions.jsonl")
    assert [{k: v for k, v in r.items() if k not in PREDICTED} for r in oof] == rows  # the file's order, once each
    runs = fold_runs(output_dir)
    for fold, run in sorted(runs.items()):
        mine = [r for r in oof if r["fold"] == fold]
        dev = read_jsonl(output_dir / "folds" / f"fold-{fold}" / "dev.json")
        assert [{k: v for k, v in r.items() if k not in PREDICTED} for r in mine] == dev
        # The fold's model never saw its dev pairs: its run trained on the other folds only.
        trained_on = read_jsonl(json.loads((run / "run_config.json").read_text())["train_file"])
        assert not {json.dumps(r, sort_keys=True) for r in trained_on} & {json.dumps(r, sort_keys=True) for r in dev}
        assert [{k: v for k, v in r.items() if k != "fold"} for r in mine] == read_jsonl(run / "predictions.jsonl")
        # ... and they are the predictions of the fold's best model, loaded with plain transformers.
        assert [r["pred_label"] for r in mine] == [str(i) for i in plain_hf_predict(run / "best", dev)]


@needs_optuna
def test_cv_md_gives_the_mean_and_std_of_the_folds_results_and_the_oof_scores(killed_and_continued):
    output_dir, _, _ = killed_and_continued
    md = (output_dir / "cv.md").read_text(encoding="utf-8")
    runs = fold_runs(output_dir)
    results = [json.loads((runs[k] / "results.json").read_text()) for k in range(FOLDS)]
    table = {cells[0]: cells[1:] for line in md.splitlines() if line.startswith("| ")
             for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for metric in ("accuracy", "f1", "loss"):
        values = [r[f"dev_{metric}"] for r in results]
        mean, std, *each = map(float, table[metric])
        assert mean == pytest.approx(statistics.mean(values), abs=5e-5), metric
        assert std == pytest.approx(statistics.stdev(values), abs=5e-5), metric
        assert each == pytest.approx(values, abs=5e-5), metric
    oof = read_jsonl(output_dir / "oof_predictions.jsonl")
    correct = sum(r["pred_label"] == r["label"] for r in oof)
    assert f"accuracy {correct / len(oof):.4f} ({correct} of {len(oof)})" in md


@needs_optuna
def test_ensemble_json_lists_the_best_folder_of_each_fold_in_fold_order(killed_and_continued):
    output_dir, _, _ = killed_and_continued
    ensemble = json.loads((output_dir / "ensemble.json").read_text(encoding="utf-8"))
    assert ensemble["kind"] == "kfold" and len(ensemble["members"]) == FOLDS
    runs = fold_runs(output_dir)
    for fold, member in enumerate(ensemble["members"]):
        assert not os.path.isabs(member) and (output_dir / member) == runs[fold] / "best"
        assert (output_dir / member / "model.safetensors").is_file()


# --- a stop signal ----------------------------------------------------------------------------------------------

@needs_optuna
def test_sigterm_stops_the_kfold_with_status_3_and_one_line_and_queues_its_fold_again(data, tmp_path):
    output_dir = tmp_path / "D"
    process = subprocess.Popen(kfold_command(data["config"], output_dir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = output_dir / "runs" / "trials" / "0000" / f"{RUN}.log"
    deadline = time.time() + limit(60)
    while not log.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    # The fold's run has started; give it a moment to be inside train.py, which takes stop signals from its first
    # line on (a signal in the tenth of a second before that kills the run outright: its fold would fail).
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=limit(60))
    assert process.returncode == 3, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("stopped: SIGTERM received: the k-fold stopped with 0 of 3 folds done"), line
    assert "run the same command again to continue" in line
    assert "WAITING" in trial_states(output_dir).values()  # the stopped fold, queued for the next run


@needs_optuna
def test_a_fold_whose_run_fails_ends_the_kfold_with_that_runs_line_and_status(data, tmp_path):
    launcher = "python -c 'import sys; print(\"error: the run refused its input\"); sys.exit(2)'"
    result = subprocess.run(kfold_command(data["config"], tmp_path / "D", "--launcher", launcher), cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=limit(60))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = last_error_line(result.stderr)
    log = tmp_path / "D" / "runs" / "trials" / "0000" / f"{RUN}.log"
    assert line.startswith(f"error: fold 0's run failed (the run refused its input; log: {log})"), line
    assert not (tmp_path / "D" / "oof_predictions.jsonl").exists()


# --- bad input: one line, exit status 2, nothing written ------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--folds", "1"], "--folds must be at least 2, got 1"),
    (["--folds", "3", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["--folds", "3", "--grace_period", "1"], "--grace_period must be from 2 to 86400 seconds"),
    (["--folds", "3", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_flag_is_one_line_before_any_heavy_import(flags, message, tmp_path):
    code = ("import sys; from afqmc_dist.kfold.__main__ import main; "
            f"status = main(['c.yaml', '--output_dir', {str(tmp_path / 'D')!r}, *{flags!r}]); "
            "print(status, [m for m in ('torch', 'transformers', 'optuna') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=limit(60))
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr[-2000:]
    assert message in last_error_line(result.stderr)
    assert not (tmp_path / "D").exists()


def test_without_optuna_the_kfold_says_how_to_install_it(data, tmp_path):
    code = ("import sys; sys.modules['optuna'] = None; from afqmc_dist.kfold.__main__ import main; "
            f"sys.exit(main([{str(data['config'])!r}, '--folds', '3', '--output_dir', {str(tmp_path / 'D')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=limit(60))
    assert result.returncode == 2
    assert last_error_line(result.stderr) == "error: k-fold needs Optuna: pip install optuna"
    assert not (tmp_path / "D").exists()


def _bad_inputs(folder: Path, model: Path, train: Path) -> dict:
    """case -> (config file, extra flags, the message expected); the files are made in `folder`."""
    def config(name: str, **changes) -> Path:
        (folder / name).mkdir()
        return write_config(folder / name, model, changes.pop("train", train), **changes)

    rare = write_jsonl(folder / "rare.json", [{"sentence1": "的了", "sentence2": "是在", "label": str(int(i < 4))}
                                              for i in range(14)])
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    bad_line = folder / "bad_line.json"
    bad_line.write_text("".join([lines[0], "{not json\n", *lines[1:]]), encoding="utf-8")
    (folder / "bad.yaml").write_text("model_checkpoint: [unclosed\n", encoding="utf-8")
    (folder / "unreadable.yaml").write_text("train_file: x\n", encoding="utf-8")
    (folder / "unreadable.yaml").chmod(0)
    return {
        "more_folds_than_the_rarest_label": (config("rare", train=rare), ["--folds", "5"],
                                             f"--folds 5: {rare} has 4 pairs of label '1', its rarest"),
        "missing_config": (folder / "none.yaml", [], f"{folder / 'none.yaml'}: no such config file"),
        "config_not_yaml": (folder / "bad.yaml", [], f"{folder / 'bad.yaml'}: not valid YAML"),
        "unreadable_config": (folder / "unreadable.yaml", [], "unreadable.yaml: not readable"),
        "unknown_option": (config("typo", learnin_rate=1e-3), [], "unknown option 'learnin_rate' (did you mean"),
        "dev_file_given": (config("dev", dev_file=str(train)), [], "dev_file: each run's dev file is its fold"),
        "eval_cap_given": (config("cap", max_eval_samples=10), [], "max_eval_samples: every run evaluates its whole"),
        "no_train_file": (config("no_train", train_file=None), [], "train_file is required"),
        "missing_train_file": (config("gone", train=folder / "gone.json"), [], "gone.json: no such file"),
        "bad_line_in_the_train_file": (config("line", train=bad_line), [], f"{bad_line}:2: not valid JSON"),
        "value_train_py_refuses": (config("lr", learning_rate=-1.0), [], "--learning_rate must be > 0"),
        "missing_launcher": (config("launcher"), ["--launcher", "no-such-launcher train.py"],
                             "--launcher: no-such-launcher: no such program"),
        "missing_model_folder": (config("model", model_checkpoint=str(folder / "no-model")), [],
                                 f"--model_checkpoint {folder / 'no-model'}: no such folder"),
    }


CASES = ("more_folds_than_the_rarest_label", "missing_config", "config_not_yaml", "unreadable_config",
         "unknown_option", "dev_file_given", "eval_cap_given", "no_train_file", "missing_train_file",
         "bad_line_in_the_train_file", "value_train_py_refuses", "missing_launcher", "missing_model_folder")


@needs_optuna
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_nothing_is_written(case, tiny_model, data, tmp_path, capsys):
    if case == "unreadable_config" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    config, flags, message = _bad_inputs(tmp_path, tiny_model, data["train"])[case]
    output_dir = tmp_path / "D"
    assert main([str(config), "--folds", "3", "--output_dir", str(output_dir), *flags]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not output_dir.exists()


@needs_optuna
@pytest.mark.parametrize(("change", "message"), [
    ({"flags": ["--folds", "4"]}, "holds a k-fold made with --folds 3, not 4"),
    ({"flags": ["--seed", "7"]}, "holds a k-fold made with --seed 42, not 7"),
    ({"config": {"learning_rate": 2e-3}}, "another config: learning_rate was 0.001, is 0.002 now"),
    ({"folder": "not_kfold"}, "is not empty and not a k-fold's folder (no kfold.json)"),
])
def test_a_folder_holding_another_kfold_is_refused_naming_the_difference(change, message, killed_and_continued, data,
                                                                        tiny_model, tmp_path, capsys):
    output_dir, _, _ = killed_and_continued
    if change.get("folder"):
        output_dir = tmp_path / change["folder"]
        output_dir.mkdir()
        (output_dir / "notes.txt").write_text("mine\n", encoding="utf-8")
    config = write_config(tmp_path, tiny_model, data["train"], **change.get("config", {}))
    kept = snapshot(output_dir)
    assert main([str(config), "--folds", "3", "--output_dir", str(output_dir), *change.get("flags", [])]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line, line
    assert snapshot(output_dir) == kept
