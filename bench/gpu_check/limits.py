"""The measured CPU basis of every GPU-check step's time limit (see checking.Step.timeout for the formula).

The numbers are in bench/results/gpu_check_cpu_basis.json, written by `python -m bench.gpu_check.cpu_basis` on an
idle 2-core CPU machine. What was measured for each step (`BASIS`): the step itself where it runs on a CPU, else
the CPU tests that do the same work, run with `python -m pytest -q` (`BASIS_COMMANDS`).
"""

from __future__ import annotations

import json

from bench.common import REPO

CPU_BASIS_FILE = "bench/results/gpu_check_cpu_basis.json"

BASIS_COMMANDS = {
    # The CPU twins of `pytest -m gpu tests`: the engine tests (FSDP2 inference path, pinned memory off, TF32
    # refused) and the bench's measuring tests.
    "gpu_tests": ["tests/test_engines.py", "tests/test_bench.py", "-k", "not quick"],
    # A real GradScaler's overflow and skip on a tiny model, fused and not, and a short training with it.
    "fp16_overflow": ["tests/test_steps.py", "tests/test_checkpoints.py", "-k",
                      "scaler or skip_nonfinite_loss_keeps_training"],
    # SIGKILL mid-run, resume latest, compared with an uninterrupted run: three training runs.
    "fsdp2_kill_resume": ["tests/test_checkpoints.py", "-k", "sigkill_resumes_bit_exact and mid-epoch-1"],
    # --torch_compile trained, evaluated and predicted, against eager: inductor compiling for the CPU.
    "torch_compile_bf16": ["tests/test_compile.py"],
    # The throughput bench's three loops (tutorial, Trainer, the tool) on the small shape.
    "bench_bert_base_bf16": ["tests/test_bench.py", "-k", "quick_bench_measures"],
    # 1 process and 2 processes (gloo) with the same global batch, compared.
    "multi_gpu_equivalence": ["tests/test_global_batch.py", "-k",
                              "every_layout_logs_the_same_global_batch_and_steps and random"],
    # 2 processes, SIGTERM, a checkpoint and exit 3.
    "multi_gpu_sigterm": ["tests/test_launcher.py", "-k", "sigterm_to_the_script and 2proc"],
}

BASIS = {
    "train_fp32": "the step itself on the CPU",
    "train_bf16": "train_fp32 on the CPU (the same runs)",
    "train_fp16": "train_fp32 on the CPU (the same runs)",
    "bf16_predictions_match_fp32": "the step itself on the CPU",
    "sigterm_resume": "the step itself on the CPU",
    **{name: "pytest " + " ".join(command) for name, command in BASIS_COMMANDS.items()},
}


def _measured() -> dict[str, float]:
    with open(REPO / CPU_BASIS_FILE, encoding="utf-8") as f:
        steps = json.load(f)["steps"]
    return {name: entry["seconds"] for name, entry in steps.items()}


CPU = _measured()
