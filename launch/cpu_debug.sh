#!/usr/bin/env bash
# One process on the CPU, full precision: the quickest way to debug the whole pipeline on a laptop.
#
#   launch/cpu_debug.sh --model_checkpoint models/tiny-bert-zh --train_file afqmc_dist/sample_data/train.json \
#       --dev_file afqmc_dist/sample_data/dev.json --output_dir outputs/debug --do_train
#
# Every argument goes to train.py. Relative paths are resolved from the repo root (the script cd's there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."   # repo root: train.py and accelerate_config.yaml are found from anywhere

# --cpu is the switch that counts: for one process accelerate's launcher REWRITES ACCELERATE_USE_CPU from its
# own --cpu flag (an exported value alone would be replaced by "False"). The export is belt and braces.
export ACCELERATE_USE_CPU=1
# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
exec python -m afqmc_dist.launcher --config_file accelerate_config.yaml --cpu \
    --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train.py "$@"
