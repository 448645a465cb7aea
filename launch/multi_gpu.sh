#!/usr/bin/env bash
# One process per GPU of this node (DDP). NPROC overrides the count (default: every GPU torch sees).
# --batch_size is per process: the global batch is batch_size x NPROC x gradient_accumulation_steps.
#
#   launch/multi_gpu.sh --model_checkpoint bert-base-chinese --train_file ... --do_train
#   NPROC=4 launch/multi_gpu.sh ...
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Count GPUs as torch will see them: CUDA_VISIBLE_DEVICES and MIG honoured (`nvidia-smi -L` lists every GPU
# of the node, plus a line per MIG slice).
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(python -c 'import torch; print(torch.cuda.device_count())')
    (( NPROC > 0 )) || {
        echo "multi_gpu.sh: torch sees no GPU: set NPROC, or use launch/cpu_debug_2proc.sh on a CPU" >&2; exit 2; }
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "multi_gpu.sh: NPROC must be a whole number >= 1, got '$NPROC'" >&2; exit 2; }
# accelerate refuses --multi_gpu with fewer than 2 processes: a 1-GPU node runs a plain single process.
MODE=()
if (( NPROC > 1 )); then MODE=(--multi_gpu); fi

# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
# MAIN_PROCESS_PORT (default 29500): two jobs on one node (e.g. two sweep workers) need different ports.
exec python -m afqmc_dist.launcher --config_file accelerate_config.yaml "${MODE[@]}" \
    --num_processes "$NPROC" --num_machines 1 --dynamo_backend no \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    train.py "$@"
