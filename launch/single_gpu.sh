#!/usr/bin/env bash
# One process on one GPU (GPU=index, default 0). Precision comes from accelerate_config.yaml ("no");
# add --mixed_precision bf16 to the arguments (train.py takes it) or use launch/bf16.sh.
#
#   GPU=1 launch/single_gpu.sh --model_checkpoint bert-base-chinese --train_file ... --do_train
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --gpu_ids sets CUDA_VISIBLE_DEVICES for the child, so the process sees only that GPU (as cuda:0).
# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
exec python -m afqmc_dist.launcher --config_file accelerate_config.yaml \
    --num_processes 1 --num_machines 1 --gpu_ids "${GPU:-0}" --dynamo_backend no \
    train.py "$@"
