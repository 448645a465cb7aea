#!/usr/bin/env bash
# Every GPU-only check of this project in one command, for a machine with one or more NVIDIA GPUs, no network,
# and the project's packages installed:
#
#   bash bench/gpu_check.sh OUT              # every step, in under 8 minutes on one GPU
#   bash bench/gpu_check.sh OUT STEP ...     # only those steps (names: bash bench/gpu_check.sh --help)
#
# Writes OUT/gpu_check.json (each step: passed / failed / skipped and why, with its numbers) and
# OUT/gpu_check.log (every command and its whole output). Exit status 0 when no step failed, 1 when one did.
# On a machine without a GPU the steps that can run on the CPU do, and the GPU steps are reported as skipped.
#
# GPU_CHECK_BUDGET (default 440) is the check's time in seconds: each step has its own limit within it, and a
# step that cannot start in what is left is skipped. PYTHON (default: python, else python3) runs everything;
# the launch scripts' `python` is that interpreter too. The steps themselves: bench/gpu_check.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $# -lt 1 ]]; then
    echo "usage: bash bench/gpu_check.sh OUT [STEP ...]   (--help for the steps)" >&2
    exit 2
fi
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${GPU_CHECK_BUDGET:-440}"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: GPU_CHECK_BUDGET=$BUDGET: a whole number of seconds" >&2; exit 2; }
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled

# The check keeps to its budget by itself; this outer limit only stops a check that hangs outside its steps.
timeout --kill-after=10 "$((BUDGET + 25))" "$PYTHON" -m bench.gpu_check --budget "$BUDGET" "$@"
status=$?
if (( status == 124 || status == 137 )); then
    echo "gpu_check.sh: killed after $((BUDGET + 25)) s; $1/gpu_check.json says how far it got" >&2
fi
exit "$status"
