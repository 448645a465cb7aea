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

command -v nvidia-smi >/dev/null 2>&1 || {
    echo "fp16.sh: fp16 needs a GPU and nvidia-smi is not found; on a CPU use launch/bf16.sh" >&2; exit 2; }
NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
MODE=(); if (( NPROC > 1 )); then MODE=(--multi_gpu); fi

# --quiet: when one process fails, end with train.py's own error line, not accelerate's re-raised traceback.
exec accelerate launch --quiet --config_file accelerate_config.yaml "${MODE[@]}" \
    --num_processes "$NPROC" --num_machines 1 --mixed_precision fp16 --dynamo_backend no \
    train.py "$@"
