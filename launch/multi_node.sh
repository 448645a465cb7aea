#!/usr/bin/env bash
# Several nodes: run this once on EVERY node, with the same variables except MACHINE_RANK.
#
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 GPUS_PER_NODE=8 launch/multi_node.sh ...   # node 0
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 GPUS_PER_NODE=8 launch/multi_node.sh ...   # node 1
#
# MAIN_PROCESS_IP is the address of the rank-0 node, reachable from all others; MAIN_PROCESS_PORT (default
# 29500) must be free there. Under SLURM see launch/slurm.sbatch, which fills these in.
#
# CPU-only nodes: ACCELERATE_USE_CPU=1 (accelerate's own switch) on every node. GPUS_PER_NODE then counts the
# processes per node, connected over gloo; each gets this node's cores / GPUS_PER_NODE threads (OMP_NUM_THREADS,
# unless set). Two "nodes" on one machine, to try it (docs/slurm.md; OMP_NUM_THREADS=1: they share its cores):
#
#   export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 NUM_MACHINES=2 MAIN_PROCESS_IP=127.0.0.1 GPUS_PER_NODE=1
#   MACHINE_RANK=0 launch/multi_node.sh ... & MACHINE_RANK=1 launch/multi_node.sh ...
#
# Every argument goes to train.py. Relative paths are resolved from the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Check everything BEFORE launching: a node started with a wrong setting would otherwise sit waiting for
# the rendezvous until it times out, with no hint of what is missing.
need() {  # need VAR "what it is": exit with one line naming VAR unless it is set and non-empty
    if [[ -z "${!1:-}" ]]; then echo "multi_node.sh: environment variable $1 is not set ($2)" >&2; exit 2; fi
}
need NUM_MACHINES "number of nodes"
need MACHINE_RANK "this node's rank, 0 .. NUM_MACHINES-1"
need MAIN_PROCESS_IP "address of the rank-0 node"
need GPUS_PER_NODE "processes per node, usually its GPU count"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
for var in NUM_MACHINES MACHINE_RANK GPUS_PER_NODE MAIN_PROCESS_PORT; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || { echo "multi_node.sh: $var must be a whole number, got '${!var}'" >&2; exit 2; }
done
(( GPUS_PER_NODE > 0 )) || { echo "multi_node.sh: GPUS_PER_NODE must be at least 1" >&2; exit 2; }
# accelerate wants the TOTAL number of processes over all nodes, not the per-node count.
NPROC=$(( NUM_MACHINES * GPUS_PER_NODE ))
case "${ACCELERATE_USE_CPU:-}" in
    1|[Tt]rue|TRUE|[Yy]es|YES|[Yy]|[Oo]n|ON)  # the spellings accelerate reads as true
        # Without it every process starts one thread per core: GPUS_PER_NODE of them would oversubscribe the node.
        threads=$(( $(nproc) / GPUS_PER_NODE ))
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}" ;;
esac

# afqmc_dist.launcher: accelerate's launch, ending with train.py's own last line and exit status, and passing
# SIGTERM / SIGUSR1 / Ctrl-C on to the training processes (see its docstring). `python` is the one on PATH.
exec python -m afqmc_dist.launcher --config_file accelerate_config.yaml --multi_gpu \
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --num_processes "$NPROC" \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" --dynamo_backend no \
    train.py "$@"
