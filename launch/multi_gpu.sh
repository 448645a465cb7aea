#!/usr/bin/env bash
# One process per GPU of this node (DDP). NPROC overrides the count (default: every GPU nvidia-smi lists).
# --batch_size is per process: the global batch is batch_size x NPROC x gradient_accumulation_steps.
#
#   launch/multi_gpu.sh --model_checkpoint bert-base-chinese --train_file ... --do_train
#   NPROC=4 launch/multi_gpu.sh ...
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${NPROC:-}" ]]; then
    command -v nvidia-smi >/dev/null 2>&1 || {
        echo "multi_gpu.sh: nvidia-smi not found (no GPU?): set NPROC, or use launch/cpu_debug_2proc.sh on a CPU" >&2
        exit 2; }
    NPROC=$(nvidia-smi -L | wc -l)
fi
# accelerate refuses --multi_gpu with fewer than 2 processes: a 1-GPU node runs a plain single process.
MODE=()
if (( NPROC > 1 )); then MODE=(--multi_gpu); fi

# --quiet: when one process fails, end with train.py's own error line, not accelerate's re-raised traceback.
exec accelerate launch --quiet --config_file accelerate_config.yaml "${MODE[@]}" \
    --num_processes "$NPROC" --num_machines 1 --dynamo_backend no \
    train.py "$@"
