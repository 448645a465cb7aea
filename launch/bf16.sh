#!/usr/bin/env bash
# bf16 mixed precision on every GPU of this node, or on the CPU when torch sees no GPU.
# bf16 is real on CPUs with bf16 units (AVX512-bf16/AMX: linear layers in bfloat16, ~1.2-1.6x faster); on an
# AVX2-only CPU it is emulated and far slower than fp32.
# NPROC overrides the process count (default: all GPUs; 1 on a CPU).
#
#   launch/bf16.sh --model_checkpoint bert-base-chinese --train_file ... --do_train
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Count GPUs as torch will see them: CUDA_VISIBLE_DEVICES and MIG honoured (`nvidia-smi -L` lists every GPU
# of the node, plus a line per MIG slice).
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
if (( GPUS > 0 )); then
    NPROC="${NPROC:-$GPUS}"
    MODE=(); if (( NPROC > 1 )); then MODE=(--multi_gpu); fi
else
    # CPU: one process needs --cpu; several need --multi_gpu + ACCELERATE_USE_CPU=1 (see cpu_debug_2proc.sh).
    export ACCELERATE_USE_CPU=1
    NPROC="${NPROC:-1}"
    if (( NPROC > 1 )); then MODE=(--multi_gpu); export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; else MODE=(--cpu); fi
fi

# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
exec python -m afqmc_dist.launcher --config_file accelerate_config.yaml "${MODE[@]}" \
    --num_processes "$NPROC" --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    train.py "$@"
