"""The Accelerator of a run, and the checks that what accelerate set up is what the run planned.

accelerate can silently turn a launch into something else than what was asked: FSDP into DDP on a CPU, 2
processes into 2 unconnected single processes, fp16 into fp32 on a CPU, the run's gradient accumulation into the
DeepSpeed config's (through ACCELERATE_GRADIENT_ACCUMULATION_STEPS, which wins over the Accelerator's argument),
its clipping into the DeepSpeed config's `gradient_clipping`. Each is refused here in one line, before any work.
"""

from __future__ import annotations

import math
import os

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType

from .distributed import first_error
from .errors import UserError
from .training.recipes import check_engine as check_recipes_engine


def make_accelerator(cfg) -> tuple[Accelerator, dict]:
    """The Accelerator for this run (precision from --mixed_precision, else the launcher/config), checked, and
    what the run records of it in run_config.json (precision, TF32). The trackers are started by tracking.py,
    each with its own folder (accelerate's `log_with` would need one logging folder for all)."""
    on_gpu = torch.cuda.is_available() and not cfg.cpu
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            # split_batches: a DataLoader batch holds the pairs of every process (one micro-batch of a global
            # batch) and each process takes its slice, so the global batches are the same on any number of
            # processes (sampling.py). No dispatching: with --streaming every process reads the file and keeps
            # its share of each batch. non_blocking: host-to-GPU copies from pinned memory overlap compute.
            dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False,
                                                      non_blocking=on_gpu),
        )
    except ValueError as e:  # e.g. bf16 asked of a device without it
        raise UserError(f"accelerate cannot set up this run: {e}") from None
    check_launch(accelerator)
    check_engine(cfg, accelerator.gradient_accumulation_steps, deepspeed_config(accelerator))
    if cfg.do_train:  # the recipes: refused before the data and the model are loaded
        check_recipes_engine(cfg, accelerator.distributed_type)
    return accelerator, {"mixed_precision": accelerator.mixed_precision, "tf32": set_tf32(cfg, accelerator)}


def check_launch(accelerator) -> None:
    """Refuse a launch that accelerate would silently turn into something else than what was asked."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("fp16 mixed precision was requested but this run is on the CPU, where fp16 does "
                        "nothing; use --mixed_precision bf16 (or no)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. --multi_gpu on a machine without GPUs: each process would train (and write) on its own.
        raise UserError(f"the launcher started {launched} processes but accelerate connected "
                        f"{accelerator.num_processes}; without GPUs, launch with ACCELERATE_USE_CPU=1 "
                        "(see launch/cpu_debug_2proc.sh)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
            and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError("the accelerate config asks for FSDP, but accelerate set up "
                        f"{accelerator.distributed_type.value} (it shards across GPUs only, and falls back "
                        "to DDP on the CPU); on a CPU, use launch/cpu_debug_2proc.sh")


def deepspeed_config(accelerator) -> dict | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.deepspeed_config if accelerator.distributed_type == DistributedType.DEEPSPEED and plugin else None


def check_engine(cfg, accumulation: int, ds_config: dict | None) -> None:
    """Refuse a run whose effective gradient accumulation or clipping differs from what it planned: the
    schedule counts optimizer steps from --gradient_accumulation_steps and would end early (or late)."""
    if accumulation != cfg.gradient_accumulation_steps:
        source = "the DeepSpeed config's gradient_accumulation_steps" if ds_config is not None \
            else "ACCELERATE_GRADIENT_ACCUMULATION_STEPS in the environment"
        raise UserError(f"--gradient_accumulation_steps is {cfg.gradient_accumulation_steps} but {source} makes "
                        f"accelerate accumulate {accumulation}: set them equal")
    if ds_config is None:
        return
    clipping = ds_config.get("gradient_clipping", 0.0)
    if clipping != "auto" and not math.isclose(float(clipping or 0.0), float(cfg.max_grad_norm)):
        raise UserError(f"--max_grad_norm is {cfg.max_grad_norm} but the DeepSpeed config clips at {clipping} (it "
                        "clips by itself, ignoring the run's value): set gradient_clipping equal to --max_grad_norm")


def set_tf32(cfg, accelerator) -> bool:
    """TF32 matmuls for fp32 work: on by default on a GPU (Ampere and newer run fp32 matmuls ~8x faster with a
    10-bit mantissa, which fine-tuning does not notice), never on the CPU. Returns the setting."""
    on_gpu = accelerator.device.type == "cuda"
    if cfg.tf32 and not on_gpu:
        raise UserError(f"--tf32 needs an NVIDIA GPU; this run is on the {accelerator.device.type}")
    tf32 = on_gpu if cfg.tf32 is None else cfg.tf32
    if on_gpu:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
    return tf32


def check_real_parameters(accelerator, model) -> None:
    """Refuse a model with weights on the meta device, on every rank together (a collective).

    With FSDP's `fsdp_cpu_ram_efficient_loading: true`, transformers 5 leaves the newly initialised weights (the
    classifier) on the meta device on every rank but the first; accelerate then maps optimizer parameters by
    data_ptr, which is 0 for all of them: one shard is never trained and another is updated twice, silently.
    """
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    error = None
    if meta:
        error = (f"{len(meta)} weights of the model are not loaded (on the meta device, e.g. {meta[0]}); with FSDP "
                 "set fsdp_cpu_ram_efficient_loading: false in the accelerate config (see launch/fsdp.yaml)")
    error = first_error(accelerator, error)
    if error:
        raise UserError(error)


def release_models(accelerator) -> None:
    """Free the prepared models (the caller drops its own references first). Call before the process group is
    destroyed: a DDP wrapper freed after it would destroy the gloo group from its reducer without releasing the
    GIL, and a gloo thread finishing a collective needs the GIL: the process would hang at exit."""
    accelerator.free_memory()
