"""What a run shows on its dashboards: W&B (offline here) through accelerate's trackers, and what happens when
W&B is asked for but cannot start."""

from __future__ import annotations

import json

import pytest
from conftest import history, run_tool
from wandb_offline import read_run, records

from afqmc_dist.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def short_run(model, data, out, *extra) -> list[str]:
    return [str(a) for a in ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"],
                             "--output_dir", out, "--do_train", "--num_train_epochs", "1", "--batch_size", "16",
                             "--max_train_samples", "64", "--logging_steps", "2", "--report_to", "wandb", *extra]]


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
