#!/usr/bin/env bash
# bf16 mixed precision on every GPU of this node, or on the CPU when there is no nvidia-smi.
# bf16 is real on CPUs with bf16 units (AVX512-bf16/AMX: linear layers in bfloat16, ~1.2-1.6x faster); on an
# AVX2-only CPU it is emulated and far slower than fp32.
# NPROC overrides the process count (default: all GPUs; 1 on a CPU).
#
#   launch/bf16.sh --model_checkpoint bert-base-chinese --train_file ... --do_train
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
    MODE=(); if (( NPROC > 1 )); then MODE=(--multi_gpu); fi
else
    # CPU: one process needs --cpu; several need --multi_gpu + ACCELERATE_USE_CPU=1 (see cpu_debug_2proc.sh).
    export ACCELERATE_USE_CPU=1
    NPROC="${NPROC:-1}"
    if (( NPROC > 1 )); then MODE=(--multi_gpu); export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; else MODE=(--cpu); fi
fi

# --quiet: when one process fails, end with train.py's own error line, not accelerate's re-raised traceback.
exec accelerate launch --quiet --config_file accelerate_config.yaml "${MODE[@]}" \
    --num_processes "$NPROC" --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    train.py "$@"
