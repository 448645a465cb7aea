#!/usr/bin/env bash
# fp16 mixed precision (autocast + gradient scaler) on every GPU of this node; NPROC overrides the count.
# GPUs only: on a CPU accelerate accepts fp16 but silently computes in fp32 with no scaler, so train.py
# refuses fp16 there. This script fails early instead; on a CPU use launch/bf16.sh.
#
#   launch/fp16.sh --model_checkpoint bert-base-chinese --train_file ... --do_train
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Count GPUs as torch will see them: CUDA_VISIBLE_DEVICES and MIG honoured (`nvidia-smi -L` lists every GPU
# of the node, plus a line per MIG slice).
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
(( GPUS > 0 )) || { echo "fp16.sh: fp16 needs a GPU and torch sees none; on a CPU use launch/bf16.sh" >&2; exit 2; }
NPROC="${NPROC:-$GPUS}"
MODE=(); if (( NPROC > 1 )); then MODE=(--multi_gpu); fi

# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
exec python -m afqmc_dist.launcher --config_file accelerate_config.yaml "${MODE[@]}" \
    --num_processes "$NPROC" --num_machines 1 --mixed_precision fp16 --dynamo_backend no \
    train.py "$@"
