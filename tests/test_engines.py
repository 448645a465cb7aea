"""What accelerate sets up must be what the run planned, under every engine (engine.py, evaluation.py).

On the CPU: the accumulation an environment variable forces, DeepSpeed's own clipping and accumulation (its config
read with accelerate's loader), weights left on the meta device by FSDP's RAM-efficient loading, TF32 recorded and
refused off a GPU, inference without `accelerator.prepare(model)`. The `gpu` tests run the same on CUDA (fp16 with
a real loss-scale overflow, FSDP2 test/predict, TF32 on by default); bench/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import last_error_line, read_jsonl, run_tool, train_args
from transformers import AutoModelForSequenceClassification

from afqmc_dist.cli import main
from afqmc_dist.config import RunConfig
from afqmc_dist.engine import check_engine, check_real_parameters
from afqmc_dist.errors import UserError
from afqmc_dist.evaluation import prepare_for_inference

ROOT = Path(__file__).resolve().parent.parent


def deepspeed_section() -> dict:
    """launch/deepspeed.yaml's DeepSpeed settings, as accelerate's own config loader reads them."""
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(ROOT / "launch" / "deepspeed.yaml")).deepspeed_config


def test_an_accumulation_forced_by_the_environment_is_refused_before_any_work(tiny_model, synthetic_data, tmp_path,
                                                                              monkeypatch, capsys,
                                                                              fresh_accelerate_state):
    """What a DeepSpeed launch does: ACCELERATE_GRADIENT_ACCUMULATION_STEPS (from its config) wins over the
    Accelerator's argument; the run would take half its planned optimizer steps and the schedule end early."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")

    status = main([str(a) for a in train_args(tiny_model, synthetic_data, tmp_path / "out")])

    assert status == 2
    assert last_error_line(capsys.readouterr().err) == (
        "error: --gradient_accumulation_steps is 1 but ACCELERATE_GRADIENT_ACCUMULATION_STEPS in the environment "
        "makes accelerate accumulate 2: set them equal")
    assert not (tmp_path / "out").exists()


def test_deepspeeds_own_clipping_and_accumulation_must_equal_the_runs():
    section = deepspeed_section()
    assert check_engine(RunConfig(), 1, section) is None  # the shipped config fits the defaults

    with pytest.raises(UserError, match=r"--max_grad_norm is 0.5 but the DeepSpeed config clips at 1.0"):
        check_engine(RunConfig(max_grad_norm=0.5), 1, section)
    with pytest.raises(UserError, match=r"--gradient_accumulation_steps is 4 but the DeepSpeed config's "
                                        r"gradient_accumulation_steps makes accelerate accumulate 1"):
        check_engine(RunConfig(gradient_accumulation_steps=4), section["gradient_accumulation_steps"], section)


def test_weights_left_on_the_meta_device_are_refused(tiny_model, fresh_accelerate_state):
    """transformers 5 with fsdp_cpu_ram_efficient_loading leaves the new classifier on `meta` on every rank but
    the first: the optimizer would be built on tensors whose data_ptr is 0."""
    accelerator = Accelerator(cpu=True)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    check_real_parameters(accelerator, model)
    model.classifier.to_empty(device="meta")

    with pytest.raises(UserError, match=r"2 weights of the model are not loaded \(on the meta device, e.g. "
                                        r"classifier.weight\); with FSDP set fsdp_cpu_ram_efficient_loading: false"):
        check_real_parameters(accelerator, model)


def test_the_fsdp_config_loads_every_weight_on_every_process():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ROOT / "launch" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False


def test_tf32_is_recorded_and_refused_off_a_gpu(tiny_model, synthetic_data, tmp_path, capsys,
                                                fresh_accelerate_state):
    out = tmp_path / "out"
    assert main([str(a) for a in train_args(tiny_model, synthetic_data, out, "--num_train_epochs", "1",
                                            "--cpu")]) == 0
    assert json.loads((out / "run_config.json").read_text())["tf32"] is False

    assert main([str(a) for a in train_args(tiny_model, synthetic_data, tmp_path / "other", "--tf32",
                                            "--cpu")]) == 2
    assert last_error_line(capsys.readouterr().err) == "error: --tf32 needs an NVIDIA GPU; this run is on the cpu"


def test_inference_uses_the_whole_model_without_preparing_it(tiny_model, fresh_accelerate_state):
    """FSDP2 refuses `prepare(model)` without an optimizer, DeepSpeed cannot size a run without a training
    loader: test and predict run the plain model on each process's device instead."""
    accelerator = Accelerator(cpu=True)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)

    ready = prepare_for_inference(accelerator, model)

    assert ready is model and not ready.training
    assert {p.device.type for p in ready.parameters()} == {accelerator.device.type}


# --- on a GPU (bench/gpu_check.sh runs these) ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["default", "skip_nonfinite_loss"])
def test_fp16_overflow_steps_are_skipped_by_the_scaler_and_training_goes_on(skip_nonfinite, fresh_accelerate_state):
    """A loss scale of 2**40 overflows fp16 activations' gradients at once: the scaler skips and lowers its scale
    until steps go through, with and without --skip_nonfinite_loss, and never raises "unscale_() has already been
    called"."""
    from accelerate.utils import GradScalerKwargs

    from afqmc_dist.training.steps import optimizer_step

    accelerator = Accelerator(mixed_precision="fp16", kwargs_handlers=[GradScalerKwargs(init_scale=2.0**40)])
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    x, y = torch.randn(32, 64, device=accelerator.device) * 100, torch.randint(0, 2, (32,), device=accelerator.device)
    skipped = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        accelerator.backward(loss)
        skipped.append(optimizer_step(accelerator, model, optimizer, scheduler, 1.0, skip_nonfinite).skipped)

    assert skipped[0], "2**40 must overflow at the first step"
    assert not all(skipped), "the scaler lowered its scale until steps went through"
    assert accelerator.scaler.get_scale() < 2.0**40


@pytest.mark.gpu
def test_tf32_is_on_by_default_on_a_gpu(tiny_model, synthetic_data, tmp_path, fresh_accelerate_state):
    out = tmp_path / "out"
    assert main([str(a) for a in train_args(tiny_model, synthetic_data, out, "--num_train_epochs", "1")]) == 0
    assert json.loads((out / "run_config.json").read_text())["tf32"] is True
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.gpu
def test_fsdp2_trains_tests_and_predicts_on_one_gpu(tiny_model, synthetic_data, tmp_path):
    """`prepare(model)` without an optimizer raised under FSDP2, so --do_test/--do_predict crashed there."""
    if not shutil.which("python"):
        pytest.skip("launch/sharded.sh runs `python` from PATH")
    out = tmp_path / "out"
    result = run_tool(train_args(tiny_model, synthetic_data, out, "--num_train_epochs", "1", "--checkpointing_steps",
                                 "8"), script="sharded.sh", env={"NPROC": "1", "ENGINE": "fsdp"})

    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((out / "test_results.json").read_text())["test_count"] == 64
    assert len(read_jsonl(out / "predictions.jsonl")) == 101
    # Sharded checkpoints are folders; `latest` must find them complete.
    from afqmc_dist.checkpoints import find_latest_checkpoint

    latest = find_latest_checkpoint(str(out))
    assert latest and any(p.is_dir() for p in Path(latest).iterdir()), os.listdir(latest)


def test_host_to_device_copies_are_non_blocking_only_on_a_gpu(fresh_accelerate_state):
    from afqmc_dist.engine import make_accelerator

    accelerator, recorded = make_accelerator(RunConfig(cpu=True))
    assert accelerator.dataloader_config.non_blocking is False and recorded["tf32"] is False


@pytest.mark.gpu
def test_on_a_gpu_batches_come_through_pinned_memory_with_non_blocking_copies(tiny_model, fresh_accelerate_state):
    from transformers import AutoTokenizer

    from afqmc_dist.data import PairDataset, PairExample, make_eval_dataloader
    from afqmc_dist.engine import make_accelerator

    cfg = RunConfig()
    accelerator, _ = make_accelerator(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    dataset = PairDataset([PairExample("的了", "是在", 1, {})] * 4)
    dataset.encode(tokenizer, cfg.max_seq_length)
    loader = make_eval_dataloader(dataset, cfg, cfg.batch_plan(1), tokenizer, accelerator)

    assert accelerator.dataloader_config.non_blocking is True and loader.pin_memory is True
