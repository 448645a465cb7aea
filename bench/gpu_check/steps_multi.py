"""The steps of `bench/gpu_check.sh` that need 2 or more GPUs (NCCL); skipped elsewhere.

The CPU versions of both (2 processes over gloo) run in the test suite: tests/test_global_batch.py and the
2-process stop-signal tests. Here the same promises are checked over NCCL.
"""

from __future__ import annotations

import signal
from pathlib import Path

from afqmc_dist.launcher import free_port
from bench.common import read_jsonl
from bench.gpu_check.checking import Check, Failed, Steps, process_tree
from bench.gpu_check.limits import BASIS, CPU
from bench.gpu_check.steps_one_device import (
    BATCH,
    DATA,
    checkpoints,
    latest_usable,
    metric_steps,
    run_args,
    steps_per_epoch,
    tiny_model,
    verify_run,
)

steps = Steps()
LAYOUTS = {"1 process": ("launch/single_gpu.sh", "1"), "2 processes": ("launch/multi_gpu.sh", "2")}


def dev_logits(best_dir: Path, weights: Path):
    """Logits of `weights` on the dev pairs, computed here with plain transformers on the CPU, in fp32."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(best_dir)
    model.load_state_dict(load_file(weights))
    tokenizer = AutoTokenizer.from_pretrained(best_dir)
    rows = read_jsonl(DATA["dev"])
    batch = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


@steps.add("multi_gpu_equivalence", "2 gpus",
           "1 vs 2 processes with --global_batch_size 16, dropout 0, TF32 off: dev predictions equal, logits "
           "within 1e-4 (as tests/test_global_batch.py on the CPU)", part=2, cpu_seconds=CPU["multi_gpu_equivalence"],
           basis=BASIS["multi_gpu_equivalence"], processes=3)
def multi_gpu_equivalence(check: Check) -> dict:
    model, total = tiny_model(check, dropout=0.0), 2 * steps_per_epoch()
    logits = {}
    for layout, (script, processes) in LAYOUTS.items():
        out = check.work / f"equivalence-{processes}"
        args = run_args(check, out, 2, "--global_batch_size", BATCH, "--checkpointing_steps", "epoch",
                        "--no_tf32", model=model)
        done = check.command(["bash", script, *args], env={"NPROC": processes, "MAIN_PROCESS_PORT": str(free_port())})
        check.expect(done, 0, f"{layout}")
        verify_run(check, out, done.output, total)
        logits[layout] = dev_logits(out / "best", out / "checkpoints" / f"step_{total}" / "model.safetensors")
    one, two = logits.values()
    numbers = {"max_logit_difference": float((one - two).abs().max()),
               "same_predictions": bool((one.argmax(-1) == two.argmax(-1)).all())}
    if not numbers["same_predictions"] or numbers["max_logit_difference"] > 1e-4:
        raise Failed(f"1 and 2 processes trained different models: {numbers}", numbers)
    return numbers


def rank_pids(root: int, rank: int) -> list[int]:
    """The processes under `root` whose environment says RANK=`rank` (the training processes of that rank)."""
    found = []
    for pid in process_tree(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            found.append(pid)
    return found


@steps.add("multi_gpu_sigterm", "2 gpus",
           "2 processes (NCCL), SIGTERM to rank 1 only: the stop-signal group stops both ranks at the same step, "
           "exit 3 and a complete checkpoint", part=2, cpu_seconds=CPU["multi_gpu_sigterm"],
           basis=BASIS["multi_gpu_sigterm"], processes=2)
def multi_gpu_sigterm(check: Check) -> dict:
    epochs = 20
    out, total = check.work / "sigterm-2gpu", epochs * steps_per_epoch()
    running = check.start(["bash", "launch/multi_gpu.sh", *run_args(check, out, epochs, "--global_batch_size", BATCH)],
                          env={"NPROC": "2", "MAIN_PROCESS_PORT": str(free_port())})
    if not running.wait_until(lambda: bool(metric_steps(out)), timeout=120):
        running.kill()
        raise Failed(f"no training step was logged before the run ended ({running.wait(10).last_line()})")
    targets = rank_pids(running.process.pid, 1)
    if not targets:
        running.kill()
        raise Failed("no process with RANK=1 found under the launcher")
    running.signal(signal.SIGTERM, targets)
    stopped = running.wait(120)
    check.expect(stopped, 3, "the 2-process run after SIGTERM to rank 1")
    saved = latest_usable(out)
    if saved is None or saved >= total:
        raise Failed(f"after SIGTERM: checkpoints {checkpoints(out)}, expected a usable one before step {total}")
    return {"signalled": "rank 1 only", "stopped_after_step": saved, "total_steps": total}
