"""bench/gpu_check.sh, the one command for a GPU machine, run here, on a machine without a GPU.

What it must do anywhere: list every step of the check in its report, run the steps the CPU allows (and pass
them), report each GPU step as skipped with the reason, keep every step to its time limit, and still write its
report when a step fails or hangs. On a GPU machine the same command runs every step (that is what it is for).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, limit

from bench.gpu_check.__main__ import PART_BUDGET, STEPS, run_step
from bench.gpu_check.checking import COMPILE_FACTOR, CUDA_START, SAFETY, Check, Failed, Step
from bench.gpu_check.limits import BASIS, CPU

# Every step the check promises, in its order (the GPU machine's checklist), with the part that runs it.
PROMISED = {
    "gpu_tests": ("gpu", 1),                       # pytest -m gpu tests
    "train_fp32": ("any", 1),                      # train/test/predict with checkpoints, per precision
    "train_bf16": ("gpu", 1),
    "train_fp16": ("gpu", 1),
    "bf16_predictions_match_fp32": ("any", 1),     # predictions in bf16 agree with fp32
    "fp16_overflow": ("gpu", 1),                   # forced loss-scale overflow, with and without --skip_nonfinite_loss
    "torch_compile_bf16": ("gpu", 1),              # recompilations counted, speed against eager
    "fsdp2_kill_resume": ("gpu", 2),               # FSDP2 on one GPU, killed, resumed: an uninterrupted run's weights
    "sigterm_resume": ("any", 2),                  # SIGTERM mid-run: exit 3, a complete checkpoint, a resume
    "bench_bert_base_bf16": ("gpu", 2),            # tool vs Trainer vs tutorial: samples/s, MFU, GPU memory
    "multi_gpu_equivalence": ("2 gpus", 2),        # 1 vs N processes
    "multi_gpu_sigterm": ("2 gpus", 2),            # the stop-signal group over NCCL
}
NEEDS = {name: needs for name, (needs, _) in PROMISED.items()}
CPU_STEPS = [name for name, needs in NEEDS.items() if needs == "any"]


def check_env(**extra) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    """The check as a lent machine runs it: part 1, then part 2 into the same folder. (The second call's result.)"""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine every step runs: there, run bash bench/gpu_check.sh itself")
    out = tmp_path_factory.mktemp("gpu-check") / "report"  # not there yet: the check creates it
    for part in ("1", "2"):
        result = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--part", part], cwd=ROOT, env=check_env(),
                                capture_output=True, text=True, timeout=limit(600))
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    return out, result, report


def by_name(report: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in report["steps"]}


def test_both_parts_exit_0_on_a_machine_without_a_gpu_and_the_second_adds_to_the_first(cpu_check):
    _, result, report = cpu_check
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert report["summary"]["ok"] and report["summary"]["failed"] == 0
    assert report["summary"]["passed"] == len(CPU_STEPS)
    assert [call["steps"] for call in report["calls"].values()] == [
        [name for name, (_, part) in PROMISED.items() if part == n] for n in (1, 2)]
    for call in report["calls"].values():
        assert 0 < call["seconds"] < call["budget_seconds"] == PART_BUDGET


def test_the_report_lists_every_step_of_the_check_in_order(cpu_check):
    _, _, report = cpu_check
    assert [(entry["name"], entry["needs"]) for entry in report["steps"]] == list(NEEDS.items())
    for entry in report["steps"]:
        assert entry["status"] in ("passed", "failed", "skipped") and entry["what"]


@pytest.mark.parametrize("part", [1, 2])
def test_each_parts_step_limits_add_up_to_less_than_its_budget(part):
    """A lent GPU machine takes a command of at most 9 minutes: each part's worst case fits its 480 s budget."""
    steps = [step for step in STEPS if step.part == part]
    assert [step.name for step in steps] == [name for name, (_, p) in PROMISED.items() if p == part]
    assert sum(step.timeout for step in steps) < PART_BUDGET <= 540 - 60


def test_every_step_limit_is_derived_from_its_cpu_measured_work():
    for step in STEPS:
        factor = COMPILE_FACTOR if step.compiles else SAFETY
        assert step.cpu_seconds > 0 and step.basis == BASIS[step.name]
        assert step.timeout == round(step.cpu_seconds * factor + CUDA_START * step.processes)
        assert step.cpu_seconds == CPU[step.name if step.name in CPU else "train_fp32"]


def test_every_gpu_step_is_skipped_with_the_reason(cpu_check):
    _, _, report = cpu_check
    reasons = {"gpu": "needs a CUDA GPU: torch sees none on this machine",
               "2 gpus": "needs 2 or more CUDA GPUs (NCCL): torch sees 0"}
    for name, entry in by_name(report).items():
        if NEEDS[name] in reasons:
            assert (entry["status"], entry["reason"]) == ("skipped", reasons[NEEDS[name]])


def test_every_step_the_cpu_allows_runs_on_the_cpu_and_passes(cpu_check):
    _, _, report = cpu_check
    steps = by_name(report)
    for name in CPU_STEPS:
        assert steps[name]["status"] == "passed", steps[name]
        assert steps[name]["seconds"] > 0
    trained = steps["train_fp32"]
    assert trained["device"] == "cpu"
    assert trained["checkpoints"] == [10, 20, 30]  # 240 pairs, batch 16, 2 epochs, a checkpoint every 10 steps
    stopped = steps["sigterm_resume"]
    assert stopped["exit_status_after_sigterm"] == 3
    assert 0 < stopped["stopped_after_step"] < stopped["total_steps"]
    compared = steps["bf16_predictions_match_fp32"]
    assert compared["pairs"] == 60 and 0 < compared["max_probability_difference"] <= 0.02


def test_the_report_names_the_machine(cpu_check):
    import importlib.metadata

    _, _, report = cpu_check
    machine = report["machine"]
    assert machine["gpu_count"] == 0 and machine["gpus"] == []
    for package in ("transformers", "accelerate"):
        assert machine[package] == importlib.metadata.version(package)
    assert machine["torch"] == torch.__version__


def test_the_log_holds_every_command_and_its_output(cpu_check):
    out, result, _ = cpu_check
    log = (out / "gpu_check.log").read_text(encoding="utf-8")
    assert "$ bash launch/cpu_debug.sh --model_checkpoint" in log
    assert "stopped: SIGTERM received" in log  # the tool's own line, from the run that was signalled
    for name in CPU_STEPS:
        assert f"===== {name}: passed" in log
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log"]
    assert [line.split()[0] for line in result.stdout.splitlines()] == [
        "passed" if needs == "any" else "skipped" for needs in NEEDS.values()]


# ------------------------------------------------------------------------------------------------ the machinery

@pytest.fixture
def check(tmp_path) -> Check:
    log_path = tmp_path / "check.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        yield Check(work=tmp_path, log_path=log_path, machine={"gpu_count": 0}, env=dict(os.environ),
                    deadline=time.monotonic() + 60, log_file=log_file)


def step(name: str, run) -> Step:
    """A step with a 60 s limit (30 s of CPU work)."""
    return Step(name, "any", f"the {name} step", run, part=1, cpu_seconds=30, basis="a test", processes=0)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_command_past_its_steps_time_limit_is_killed_with_its_children(check):
    check.step_deadline = time.monotonic() + 2
    started = time.monotonic()
    done = check.command(["bash", "-c", "sleep 60 & echo child $!; sleep 60"])
    assert done.timed_out and time.monotonic() - started < 10
    child = int(done.output.split("child ")[1].split()[0])
    time.sleep(0.2)
    assert not alive(child)
    assert "# killed at its time limit" in check.log_path.read_text()


def test_a_step_that_breaks_is_reported_failed_and_the_check_goes_on(check):
    def broken(_check):
        raise KeyError("missing")

    def failing(_check):
        raise Failed("wrong answer", {"measured": 1.5})

    entry = run_step(step("broken", broken), check)
    assert (entry["status"], entry["reason"]) == ("failed", "unexpected KeyError: 'missing'")
    assert "Traceback" in check.log_path.read_text()
    entry = run_step(step("failing", failing), check)
    assert (entry["status"], entry["reason"], entry["measured"]) == ("failed", "wrong answer", 1.5)
    entry = run_step(step("fine", lambda _check: {"value": 3}), check)
    assert (entry["status"], entry["reason"], entry["value"]) == ("passed", None, 3)


def test_a_step_that_cannot_start_within_the_budget_is_skipped(check):
    check.deadline = time.monotonic() + 5
    entry = run_step(step("late", lambda _check: {}), check)
    assert entry["status"] == "skipped" and entry["reason"].startswith("time budget spent")


def test_named_steps_only_and_an_unknown_name_is_refused(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "train_fp32", "no_such_step"], cwd=ROOT,
                            env=check_env(), capture_output=True, text=True, timeout=limit(120))
    assert result.returncode == 2 and "unknown step 'no_such_step'" in result.stderr
    assert not out.exists()
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "sigterm_resume"], cwd=ROOT,
                            env=check_env(GPU_CHECK_BUDGET="3"), capture_output=True, text=True, timeout=limit(120))
    assert result.returncode == 0, result.stderr[-2000:]
    (entry,) = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert entry["name"] == "sigterm_resume" and entry["status"] == "skipped"
    assert entry["reason"].startswith("time budget spent")
