"""Every GPU-only check of the project, for a machine lent for minutes: two calls of `bash bench/gpu_check.sh`.

    bash bench/gpu_check.sh OUT --part 1           # pytest -m gpu, train in every precision, torch.compile
    bash bench/gpu_check.sh OUT --part 2           # FSDP2 kill + resume, SIGTERM + resume, the bench, 2 GPUs
    bash bench/gpu_check.sh OUT                    # both parts in one call
    bash bench/gpu_check.sh OUT sigterm_resume     # only the named steps (e.g. to rerun the ones that failed)

Writes OUT/gpu_check.json (the report; a second part adds its steps to the first's) and OUT/gpu_check.log (every
command with its whole output). The steps are in steps_one_device.py (correctness on one device), steps_speed.py
(torch.compile, the bench) and steps_multi.py (2+ GPUs), the machinery in checking.py, each step's time limit
derived from its work measured on a CPU (limits.py). Each step needs either nothing ("any": on a machine without
a GPU it runs on the CPU), a CUDA GPU ("gpu") or two ("2 gpus"), and is skipped, saying why, where that is
missing.

Made to survive a bad machine:
- no network: HF_HUB_OFFLINE=1, no W&B, a tiny model built on the spot, the bundled sample data;
- every command runs under the time limit of its step (and of the call: `--budget`, by default PART_BUDGET per
  part, so that each call ends within 9 minutes however its steps go; the limits are worst cases, derived from
  CPU timings: a GPU machine takes about half); at the limit the command's whole process tree is killed, the step
  is recorded as failed and the next step runs; a step that can no longer start within the budget is skipped;
- the report is rewritten after every step (atomically: never half-written), and before a step starts it already
  says "failed: did not finish" for it: if the whole check is killed, the report still says where;
- the work (models, runs, checkpoints) goes to a temporary folder that is removed at the end (`--keep_work` keeps
  it and says where).

Report: {"machine": {python, torch, transformers, accelerate, cuda, gpus: [names], ...},
         "steps": [{"name", "needs", "what", "status": passed|failed|skipped, "reason", "seconds", ...numbers}],
         "summary": {"passed", "failed", "skipped", "seconds", "budget_seconds", "ok"}}.
Exit status: 0 when no step failed, 1 when one did, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import REPO
from bench.gpu_check import steps_multi, steps_one_device, steps_speed
from bench.gpu_check.checking import Check, Failed, Skipped, Step

# Every step, part 1's first (within a part, in the order the modules define them).
STEPS: list[Step] = sorted([*steps_one_device.steps, *steps_speed.steps, *steps_multi.steps], key=lambda s: s.part)
PARTS = (1, 2)
REPORT, LOG = "gpu_check.json", "gpu_check.log"
PART_BUDGET = 480.0  # seconds per call: with its own start-up, each call stays under 9 minutes


def probe() -> None:
    """Print this interpreter's versions and GPUs as one JSON line (run in a child: see machine_info)."""
    import importlib.metadata
    import platform

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **{package: version(package) for package in ("transformers", "accelerate", "safetensors", "triton",
                                                         "wandb", "deepspeed")},
            "gpu_count": count, "gpus": [torch.cuda.get_device_name(i) for i in range(count)]}
    if count:
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        try:
            nccl = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except (AttributeError, RuntimeError) as e:
            info["nccl"] = f"unknown ({e})"
    print(json.dumps(info))


def machine_info(python: str) -> dict:
    """Versions and GPUs, asked of a separate interpreter (this process never initialises CUDA). When that fails,
    `probe_error` says why and the check fails: a GPU machine must not pass by skipping its GPU steps."""
    command = [python, "-c", "from bench.gpu_check.__main__ import probe; probe()"]
    host = {"host": os.uname().nodename, "cpus": os.cpu_count()}
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as e:
        return {"gpu_count": 0, "probe_error": f"{type(e).__name__}: {e}", **host}
    try:
        return {**json.loads(done.stdout.strip().splitlines()[-1]), **host}
    except (ValueError, IndexError):
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}, no output"])[-1]
        return {"gpu_count": 0, "probe_error": last, **host}


def write_report(out: Path, report: dict) -> None:
    """Write OUT/gpu_check.json atomically (a temporary file renamed into place)."""
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / REPORT)


def requirement_missing(needs: str, check: Check) -> str | None:
    """Why a step that needs `needs` cannot run on this machine, or None."""
    gpus = check.machine.get("gpu_count", 0)
    if needs != "any" and "probe_error" in check.machine:
        return f"torch could not be asked about GPUs: {check.machine['probe_error']}"
    if needs == "gpu" and not gpus:
        return "needs a CUDA GPU: torch sees none on this machine"
    if needs == "2 gpus" and gpus < 2:
        return f"needs 2 or more CUDA GPUs (NCCL): torch sees {gpus}"
    return None


def run_step(spec: Step, check: Check) -> dict:
    """Run one step; its report entry (never raises)."""
    entry = {"name": spec.name, "needs": spec.needs, "what": spec.what}
    missing = requirement_missing(spec.needs, check)
    if missing:
        return {**entry, "status": "skipped", "reason": missing, "seconds": 0.0}
    left = check.deadline - time.monotonic()
    if left < spec.timeout / 2:  # it would most likely be cut short: a skip says more than a kill would
        return {**entry, "status": "skipped", "seconds": 0.0,
                "reason": f"time budget spent: {left:.0f} s left of the check's budget, the step may need up to "
                          f"{spec.timeout:.0f} s"}
    limit = min(spec.timeout, left)
    check.step_deadline = time.monotonic() + limit
    check.say(f"\n===== {spec.name} ({spec.what}; needs {spec.needs}; limit {limit:.0f} s)")
    started = time.monotonic()
    try:
        numbers = spec.run(check) or {}
        status, reason = "passed", None
    except Skipped as e:
        numbers, status, reason = {}, "skipped", str(e)
    except Failed as e:
        numbers, status, reason = e.numbers, "failed", str(e)
    except Exception as e:  # noqa: BLE001 - a bug in a step must not stop the others: reported, traceback logged
        check.say(traceback.format_exc())
        numbers, status, reason = {}, "failed", f"unexpected {type(e).__name__}: {e}"
    seconds = round(time.monotonic() - started, 1)
    if status == "failed" and limit < spec.timeout and time.monotonic() >= check.step_deadline - 1:
        reason += f" (the check's budget left this step {limit:.0f} s of its {spec.timeout:.0f})"
    check.say(f"===== {spec.name}: {status}{f' ({reason})' if reason else ''} in {seconds} s")
    return {**entry, "status": status, "reason": reason, "seconds": seconds, **numbers}


def summary(steps: list[dict], calls: dict, machine: dict) -> dict:
    """Counts over every step reported so far; seconds and budget over every call of the check."""
    counts = {status: sum(s["status"] == status for s in steps) for status in ("passed", "failed", "skipped")}
    return {**counts, "seconds": round(sum(c["seconds"] for c in calls.values()), 1),
            "budget_seconds": sum(c["budget_seconds"] for c in calls.values()),
            "ok": counts["failed"] == 0 and "probe_error" not in machine}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for gpu_check.json and gpu_check.log (created if missing)")
    p.add_argument("steps", nargs="*", metavar="STEP", help="run only these: " + ", ".join(s.name for s in STEPS))
    p.add_argument("--part", type=int, choices=PARTS, help="run one part of the check (both when not given)")
    p.add_argument("--budget", type=float, default=os.environ.get("GPU_CHECK_BUDGET"),
                   help=f"seconds for this call (default {PART_BUDGET:.0f} per part, or $GPU_CHECK_BUDGET)")
    p.add_argument("--keep_work", action="store_true", help="keep the scratch folder (runs, models, checkpoints)")
    args = p.parse_args(argv)
    unknown = [name for name in args.steps if name not in {s.name for s in STEPS}]
    if unknown:
        p.error(f"unknown step {unknown[0]!r}: choose from {', '.join(s.name for s in STEPS)}")
    if args.budget is None:
        args.budget = PART_BUDGET * (1 if args.part or args.steps else len(PARTS))
    return args


def selected_steps(args: argparse.Namespace) -> list[Step]:
    return [s for s in STEPS if (not args.steps or s.name in args.steps) and (not args.part or s.part == args.part)]


def earlier_report(out: Path, args: argparse.Namespace) -> dict | None:
    """The report this call adds to: part 2's and named steps' add to the one in OUT (part 1 starts anew)."""
    path = out / REPORT
    if args.part == 1 or not (args.part or args.steps) or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def environment(work: Path) -> dict:
    """Every command's environment: offline, no W&B, caches in the scratch folder, and `python` on PATH is this
    interpreter (the launch scripts call `python`)."""
    shims = work / "bin"
    shims.mkdir(parents=True, exist_ok=True)
    shim = shims / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    path = os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "XDG_CACHE_HOME": str(work / "cache"),
            "HF_HOME": str(work / "cache" / "huggingface"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_steps(selected: list[Step], check: Check, out: Path, report: dict, started: float, budget: float) -> None:
    """Run the steps one after the other, the report rewritten around each (it says where a killed check was)."""
    entries = {e["name"]: e for e in report["steps"]}
    for spec in selected:
        entries[spec.name] = {"name": spec.name, "needs": spec.needs, "what": spec.what, "status": "skipped",
                              "seconds": 0.0, "reason": "not reached: the check ended before this step"}
    order = [s.name for s in STEPS if s.name in entries]

    def write(calls: dict) -> None:
        report["steps"] = [entries[name] for name in order]
        report["summary"] = summary(report["steps"], calls, check.machine)
        write_report(out, report)

    calls = {**report.get("calls", {}), str(len(report.get("calls", {})) + 1): {
        "steps": [s.name for s in selected], "budget_seconds": budget, "seconds": 0.0}}
    report["calls"] = calls
    this_call = calls[str(len(calls))]
    for spec in selected:
        entries[spec.name] = {**entries[spec.name], "status": "failed",
                              "reason": "did not finish: the check was killed while it ran"}
        write(calls)
        entries[spec.name] = run_step(spec, check)
        this_call["seconds"] = round(time.monotonic() - started, 1)
        write(calls)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    selected = selected_steps(args)
    report = earlier_report(out, args) or {"steps": []}
    with open(out / LOG, "a" if report["steps"] else "w", encoding="utf-8") as log_file:
        check = Check(work=work, log_path=out / LOG, machine={}, env=environment(work),
                      deadline=started + args.budget, log_file=log_file)
        check.say(f"gpu_check: {len(selected)} step(s), budget {args.budget:.0f} s, scratch {work}")
        check.machine = report["machine"] = machine_info(sys.executable)
        check.say(f"machine: {json.dumps(check.machine)}")
        if shutil.which("nvidia-smi"):
            check.step_deadline = time.monotonic() + 30
            check.command(["nvidia-smi"])
        run_steps(selected, check, out, report, started, args.budget)
        s = report["summary"]
        check.say(f"\ngpu_check: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped "
                  f"in {s['seconds']:.0f} s -> {out / REPORT}")
    if args.keep_work:
        print(f"scratch kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    for entry in report["steps"]:
        reason = f": {entry['reason']}" if entry["reason"] else ""
        print(f"{entry['status']:>8}  {entry['name']}{reason}")
    if "probe_error" in check.machine:
        print(f"  failed  asking torch about the machine: {check.machine['probe_error']}")
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
