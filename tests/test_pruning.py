"""TrialReporter: a sweep trial's run reports its dev evaluations to a real Optuna study (SQLite) and stops when
the study's pruner says so, with the same answer on every rank; outside a sweep it does not exist and Optuna is
never imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, limit

from afqmc_dist.errors import UserError
from afqmc_dist.sweep.pruning import METRIC_ENV, PRUNER_ENV, STORAGE_ENV, STUDY_ENV, TRIAL_ENV, TrialReporter

optuna = pytest.importorskip("optuna", reason="needs optuna, which is not installed")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

MEDIAN = json.dumps({"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})


@pytest.fixture
def study(tmp_path):
    """A study holding one complete trial that scored 0.8 then 0.9, and two running trials."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={10: 0.8, 20: 0.9}))
    study.ask(), study.ask()
    return study, storage


def trial_env(monkeypatch, storage: str, trial_id: int) -> None:
    for name, value in ((STORAGE_ENV, storage), (STUDY_ENV, "s"), (TRIAL_ENV, str(trial_id)),
                        (METRIC_ENV, "accuracy"), (PRUNER_ENV, MEDIAN)):
        monkeypatch.setenv(name, value)


def running(study) -> list:
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]


def test_a_trial_below_the_median_is_pruned_and_one_above_goes_on(study, monkeypatch):
    from accelerate import Accelerator

    study, storage = study
    weak, strong = running(study)
    accelerator = Accelerator(cpu=True)
    trial_env(monkeypatch, storage, weak._trial_id)
    reporter = TrialReporter.from_env(accelerator, cfg=None)
    assert reporter.should_prune(10, {"accuracy": 0.5, "loss": 0.7}) is True
    assert reporter.pruned_message(10).startswith(f"sweep trial {weak.number} pruned at step 10 (dev accuracy 0.5000)")

    trial_env(monkeypatch, storage, strong._trial_id)
    reporter = TrialReporter.from_env(accelerator, cfg=None)
    assert reporter.should_prune(10, {"accuracy": 0.85}) is False
    assert reporter.should_prune(20, {"accuracy": float("nan")}) is False  # not reported: Optuna refuses NaN
    values = {t.number: t.intermediate_values for t in study.get_trials()}
    assert values[weak.number] == {10: 0.5} and values[strong.number] == {10: 0.85}


def test_outside_a_sweep_there_is_no_reporter_and_incomplete_settings_are_refused(study, monkeypatch):
    from accelerate import Accelerator

    study, storage = study
    for name in (STORAGE_ENV, STUDY_ENV, TRIAL_ENV, METRIC_ENV, PRUNER_ENV):
        monkeypatch.delenv(name, raising=False)
    accelerator = Accelerator(cpu=True)
    assert TrialReporter.from_env(accelerator, cfg=None) is None
    trial_env(monkeypatch, storage, running(study)[0]._trial_id)
    monkeypatch.delenv(PRUNER_ENV)
    with pytest.raises(UserError, match="incomplete sweep trial settings"):
        TrialReporter.from_env(accelerator, cfg=None)
    trial_env(monkeypatch, storage, 999)
    with pytest.raises(UserError, match="cannot open trial 999 of sweep study 's'"):
        TrialReporter.from_env(accelerator, cfg=None)


def test_a_plain_run_imports_no_sweep_or_tracker_package():
    # The GPU machines have none of them: the training path must not need them unless asked for.
    code = ("import sys; import afqmc_dist.cli, afqmc_dist.sweep.pruning, afqmc_dist.tracking; "
            "print(sorted(m for m in ('optuna', 'mlflow', 'tensorboard', 'wandb') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=limit(120))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


SCRIPT = """
import sys
from accelerate import Accelerator
from afqmc_dist.sweep.pruning import TrialReporter

accelerator = Accelerator(cpu=True)
reporter = TrialReporter.from_env(accelerator, cfg=None)
# Rank 1 sees a dev accuracy that alone would not be pruned: only the main process's answer counts.
accuracy = 0.1 if accelerator.is_main_process else 0.99
decision = reporter.should_prune(10, {"accuracy": accuracy})
print(f"rank {accelerator.process_index} prune {decision} optuna {'optuna' in sys.modules}", flush=True)
accelerator.end_training()
"""


def test_every_rank_gets_the_main_process_answer_and_only_the_main_process_opens_the_study(study, tmp_path):
    study, storage = study
    script = tmp_path / "report.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, STORAGE_ENV: storage, STUDY_ENV: "s", TRIAL_ENV: str(running(study)[0]._trial_id),
           METRIC_ENV: "accuracy", PRUNER_ENV: MEDIAN, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit(180))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0 prune True optuna True", "rank 1 prune True optuna False"]
    assert study.get_trials()[running(study)[0].number].intermediate_values == {10: 0.1}
