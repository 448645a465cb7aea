#!/usr/bin/env bash
# Sharded training on every GPU of this node: FSDP2 (launch/fsdp.yaml, the default) or DeepSpeed ZeRO-2
# (ENGINE=deepspeed: launch/deepspeed.yaml, needs `pip install deepspeed`). See the comments in those files.
# NPROC overrides the process count (default: every GPU nvidia-smi lists); MIXED_PRECISION: no (default), bf16, fp16;
# MAIN_PROCESS_PORT (default 29500): two jobs on one node need different ports.
# Use --global_batch_size: the per-process batch then follows the number of GPUs and the training stays the same.
#
#   launch/sharded.sh --model_checkpoint bert-base-chinese --global_batch_size 32 --train_file ... --do_train
#   ENGINE=deepspeed NPROC=4 MIXED_PRECISION=bf16 launch/sharded.sh ...
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ENGINE="${ENGINE:-fsdp}"
[[ -f "launch/$ENGINE.yaml" ]] || { echo "sharded.sh: ENGINE=$ENGINE: use fsdp or deepspeed" >&2; exit 2; }
if [[ -z "${NPROC:-}" ]]; then
    command -v nvidia-smi >/dev/null 2>&1 || {
        echo "sharded.sh: nvidia-smi not found: sharded training needs GPUs (launch/cpu_debug_2proc.sh on a CPU)" >&2
        exit 2; }
    NPROC=$(nvidia-smi -L | wc -l)
fi

# --quiet: when one process fails, end with train.py's own error line, not accelerate's re-raised traceback.
exec accelerate launch --quiet --config_file "launch/$ENGINE.yaml" \
    --num_processes "$NPROC" --mixed_precision "${MIXED_PRECISION:-no}" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    train.py "$@"
