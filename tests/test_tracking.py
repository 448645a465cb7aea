"""What a run shows on its dashboards: W&B (offline here), TensorBoard and MLflow through accelerate's trackers,
read back with each tracker's own reader; what happens when a tracker is asked for but cannot start; and that
nothing non-finite is ever written."""

from __future__ import annotations

import json
import math

import pytest
from conftest import history, read_jsonl, requires, run_tool
from wandb_offline import read_run, records

from afqmc_dist.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def short_run(model, data, out, *extra, trackers: str = "wandb") -> list[str]:
    return [str(a) for a in ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"],
                             "--output_dir", out, "--do_train", "--num_train_epochs", "1", "--batch_size", "16",
                             "--max_train_samples", "64", "--logging_steps", "2", "--report_to", trackers, *extra]]


def logged_numbers(out) -> dict[tuple[str, int], float]:
    """metrics.jsonl as {(name, step): value} for every number logged (the tracker values to compare with)."""
    numbers = {}
    for record in read_jsonl(out / "metrics.jsonl"):
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                numbers[(key, record["step"])] = value
    return numbers


def tensorboard_values(folder) -> dict[tuple[str, int], float]:
    """Every scalar in the event files of `folder`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    values = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    values.update({(tag, e.step): tensor_util.make_ndarray(e.tensor_proto).item()
                   for tag in events.Tags()["tensors"] for e in events.Tensors(tag)})
    return values


@requires("tensorboard", "mlflow", "wandb")
def test_tensorboard_mlflow_and_wandb_each_get_the_numbers_of_metrics_jsonl_the_config_and_the_summary(
        tiny_model, synthetic_data, tmp_path):
    import mlflow

    out = tmp_path / "out"
    result = run_tool(short_run(tiny_model, synthetic_data, out, "--learning_rate", "2e-3", "--eval_steps", "2",
                                trackers="tensorboard,mlflow,wandb"), env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert " is off" not in result.stdout
    expected = logged_numbers(out)
    best = json.loads((out / "results.json").read_text())
    assert len([k for k in expected if k[0] == "dev/accuracy"]) >= 2 and ("train/loss", 2) in expected

    # TensorBoard: OUTPUT_DIR/tensorboard, in double precision.
    board = tensorboard_values(out / "tensorboard")
    assert {k: v for k, v in board.items() if k in expected} == expected
    assert set(expected) <= set(board)
    assert board[("best_dev_accuracy", max(step for _, step in expected))] == best["dev_accuracy"]

    # MLflow: the default local store OUTPUT_DIR/mlflow.db, one run in the project's experiment.
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("afqmc-dist").experiment_id])
    tracked = {(key, m.step): m.value for key in {k for k, _ in expected}
               for m in client.get_metric_history(run.info.run_id, key)}
    assert tracked == expected
    assert run.data.metrics["best_dev_accuracy"] == best["dev_accuracy"]
    assert run.data.params["learning_rate"] == "0.002" and run.data.params["num_processes"] == "1"

    # W&B (offline): the history rows and the summary.
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    summary, config, rows = read_run(run_file)
    wandb_values = {(k, row["_step"]): v for row in rows for k, v in row.items()  # the matrix is a table there
                    if not k.startswith("_") and "confusion_matrix/" not in k and isinstance(v, (int, float))}
    assert wandb_values == expected
    assert summary["best_dev_accuracy"] == best["dev_accuracy"] and config["learning_rate"] == 0.002


def test_a_tracker_that_cannot_start_is_one_line_and_the_run_goes_on_unless_require_tracker(
        tiny_model, synthetic_data, tmp_path, monkeypatch, capsys):
    """Where MLflow is not installed it cannot start either: the same lines follow."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    out = tmp_path / "out"
    assert main(short_run(tiny_model, synthetic_data, out, trackers="mlflow")) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if " is off" in line]
    assert line.startswith("MLflow is off: it did not start (") and "metrics go to metrics.jsonl only" in line
    assert len(history(out)) == 1

    assert main(short_run(tiny_model, synthetic_data, tmp_path / "strict", "--require_tracker",
                          trackers="mlflow")) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith("error: --report_to mlflow: MLflow did not start (")
    # It ends with what to do: set the URI up, or install MLflow where it is missing.
    assert error.endswith(("); check MLFLOW_TRACKING_URI", "); pip install mlflow-skinny"))


@requires("tensorboard")
def test_numbers_that_are_not_finite_are_left_out_of_metrics_jsonl_and_every_tracker(tmp_path):
    from accelerate import Accelerator

    from afqmc_dist.config import RunConfig
    from afqmc_dist.tracking import Tracker

    cfg = RunConfig(output_dir=str(tmp_path), report_to=["tensorboard"])
    tracker = Tracker(Accelerator(cpu=True), cfg, run_info={})
    tracker.log({"loss": math.nan, "grad_norm": math.inf, "learning_rate": 1e-3, "samples_per_second": 12.5},
                "train", step=4)
    tracker.summarize({"best_dev_loss": -math.inf, "train_steps": 4})
    tracker.finish()

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    text = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line, parse_constant=refuse) for line in text.splitlines()] == [
        {"step": 4, "train/learning_rate": 1e-3, "train/samples_per_second": 12.5}]
    assert tensorboard_values(tmp_path / "tensorboard") == {("train/learning_rate", 4): 1e-3,
                                                            ("train/samples_per_second", 4): 12.5,
                                                            ("train_steps", 4): 4.0}


@requires("wandb")
def test_wandb_without_a_login_or_offline_mode_says_why_and_the_run_goes_on(tiny_model, synthetic_data, tmp_path,
                                                                           monkeypatch, capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "out"

    assert main(short_run(tiny_model, synthetic_data, out)) == 0

    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("W&B is off")]
    assert "did not start (UsageError:" in line and "metrics go to metrics.jsonl only" in line
    assert (out / "best").is_dir() and len(history(out)) == 1 and len(history(out, "train")) == 2


@requires("wandb")
def test_offline_run_carries_group_tags_confusion_matrix_and_the_best_model_artifact(tiny_model, synthetic_data,
                                                                                    tmp_path):
    out = tmp_path / "out"
    result = run_tool(short_run(tiny_model, synthetic_data, out, "--wandb_group", "sweep-1", "--wandb_tags", "tiny",
                                "cpu", "--run_name", "r1", "--wandb_log_model"), env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B is off" not in result.stdout

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    kinds = [(r.WhichOneof("record_type"), r) for r in records(run_file)]
    run = next(r.run for kind, r in kinds if kind == "run")
    assert (run.run_group, list(run.tags), run.display_name) == ("sweep-1", ["tiny", "cpu"], "r1")
    artifacts = [r.artifact for kind, r in kinds if kind == "artifact" and r.artifact.type == "model"]
    assert len(artifacts) == 1  # best/, uploaded once at the end
    assert {entry.path for entry in artifacts[0].manifest.contents} >= {"model.safetensors", "config.json"}
    summary, config, rows = read_run(run_file)
    (dev_row,) = [row for row in rows if "dev/accuracy" in row]
    # The confusion matrix is a W&B table: one row per (actual, predicted) cell of the 2 labels.
    assert dev_row["dev/confusion_matrix/_type"] == "table-file" and dev_row["dev/confusion_matrix/nrows"] == 4
    assert summary["best_dev_accuracy"] == json.loads((out / "results.json").read_text())["dev_accuracy"]
    assert config["wandb_tags"] == ["tiny", "cpu"]
