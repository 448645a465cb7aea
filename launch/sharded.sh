#!/usr/bin/env bash
# Sharded training on every GPU of this node: FSDP2 (launch/fsdp.yaml, the default) or DeepSpeed ZeRO-2
# (ENGINE=deepspeed: launch/deepspeed.yaml, needs `pip install deepspeed`). See the comments in those files.
# NPROC overrides the process count (default: every GPU torch sees); MIXED_PRECISION: no (default), bf16, fp16;
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
# Count GPUs as torch will see them: CUDA_VISIBLE_DEVICES and MIG honoured (`nvidia-smi -L` lists every GPU
# of the node, plus a line per MIG slice).
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(python -c 'import torch; print(torch.cuda.device_count())')
    (( NPROC > 0 )) || {
        echo "sharded.sh: torch sees no GPU: sharded training needs GPUs (launch/cpu_debug_2proc.sh on a CPU)" >&2
        exit 2; }
fi

# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
exec python -m afqmc_dist.launcher --config_file "launch/$ENGINE.yaml" \
    --num_processes "$NPROC" --mixed_precision "${MIXED_PRECISION:-no}" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    train.py "$@"
