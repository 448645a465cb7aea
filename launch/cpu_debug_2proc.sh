#!/usr/bin/env bash
# NPROC (default 2) real processes on the CPU, connected over gloo (DDP, DistributedType.MULTI_CPU).
# It proves the distributed code paths (sharding, gather_for_metrics, rank-0-only writes) without a GPU;
# it is not faster than one process on a small machine.
#
#   launch/cpu_debug_2proc.sh --model_checkpoint models/tiny-bert-zh --train_file ... --do_train
#   NPROC=4 OMP_NUM_THREADS=2 launch/cpu_debug_2proc.sh ...
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Why this odd combination (measured with accelerate 1.15):
# - `accelerate launch --cpu --num_processes 2` starts ONE process (its multi-CPU path needs mpirun);
# - `--multi_gpu` starts NPROC processes through torchrun, but without ACCELERATE_USE_CPU=1 on a GPU-less
#   machine they are unconnected single processes. With it, they join one gloo process group.
#   (use_cpu: true in a YAML config is not passed on to these processes; the env variable is.)
export ACCELERATE_USE_CPU=1
# Each process would otherwise start one thread per core: NPROC processes would oversubscribe the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
NPROC="${NPROC:-2}"   # --multi_gpu needs at least 2
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "cpu_debug_2proc.sh: NPROC must be a whole number >= 1, got '$NPROC'" >&2; exit 2; }
# Two debug jobs on one machine need different ports.
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"

# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
exec python -m afqmc_dist.launcher --config_file accelerate_config.yaml --multi_gpu \
    --num_processes "$NPROC" --num_machines 1 --mixed_precision no --dynamo_backend no \
    --main_process_port "$MAIN_PROCESS_PORT" \
    train.py "$@"
