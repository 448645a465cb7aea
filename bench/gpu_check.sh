#!/usr/bin/env bash
# Every GPU-only check of this project, for a machine with one or more NVIDIA GPUs, no network, and the
# project's packages installed. Two calls, each within 9 minutes (the same OUT: the second adds to the report):
#
#   bash bench/gpu_check.sh OUT --part 1     # pytest -m gpu, train/test/predict in every precision, torch.compile
#   bash bench/gpu_check.sh OUT --part 2     # FSDP2 kill + resume, SIGTERM + resume, the bench, 2 GPUs
#   bash bench/gpu_check.sh OUT              # both parts in one call
#   bash bench/gpu_check.sh OUT STEP ...     # only those steps (names: bash bench/gpu_check.sh --help)
#
# Writes OUT/gpu_check.json (each step: passed / failed / skipped and why, with its numbers) and
# OUT/gpu_check.log (every command and its whole output). Exit status 0 when no step failed, 1 when one did.
# On a machine without a GPU the steps that can run on the CPU do, and the GPU steps are reported as skipped.
#
# GPU_CHECK_BUDGET (default 480 per part) is the call's time in seconds: each step has its own limit within it
# (derived from its work measured on a CPU: bench/gpu_check/limits.py), and a step that cannot start in what is
# left is skipped. PYTHON (default: python, else python3) runs everything; the launch scripts' `python` is that
# interpreter too. The steps themselves: bench/gpu_check/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $# -lt 1 ]]; then
    echo "usage: bash bench/gpu_check.sh OUT [--part 1|2] [STEP ...]   (--help for the steps)" >&2
    exit 2
fi
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
if [[ -n "${GPU_CHECK_BUDGET:-}" && ! "$GPU_CHECK_BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: GPU_CHECK_BUDGET=$GPU_CHECK_BUDGET: a whole number of seconds" >&2; exit 2
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled

# The check keeps to its budget by itself (480 s per part unless GPU_CHECK_BUDGET says otherwise); this outer
# limit only stops a check that hangs outside its steps.
OUTER=$(( ${GPU_CHECK_BUDGET:-960} + 25 ))
timeout --kill-after=10 "$OUTER" "$PYTHON" -m bench.gpu_check "$@"
status=$?
if (( status == 124 || status == 137 )); then
    echo "gpu_check.sh: killed after $OUTER s; $1/gpu_check.json says how far it got" >&2
fi
exit "$status"
