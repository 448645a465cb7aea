"""Measure, on a CPU, the work behind each step of the GPU check: the basis of every step's time limit.

    python -m bench.gpu_check.cpu_basis            # -> bench/results/gpu_check_cpu_basis.json, and a table

Each step's work is timed here as it runs on a CPU: the step itself where it can (train_fp32,
bf16_predictions_match_fp32, sigterm_resume, through `bash bench/gpu_check.sh`), else the CPU tests that do the
same work (the same training runs, kills and resumes, compilations and launches; `BASIS` in limits.py names them).
Run it with nothing else on the machine: the 1-minute load is recorded before and after each measurement, and a
measurement taken under load says so in the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO
from bench.gpu_check.limits import BASIS_COMMANDS, CPU_BASIS_FILE

TIMEOUT = 900


def measure(name: str, command: list[str], env: dict) -> dict:
    load = os.getloadavg()[0]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        raise SystemExit(f"error: {name}: {' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}"
                         f"{done.stderr[-2000:]}")
    return {"seconds": seconds, "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "command": " ".join(command)}


def step_seconds(report: Path, name: str) -> float:
    steps = {s["name"]: s for s in json.loads(report.read_text(encoding="utf-8"))["steps"]}
    if steps[name]["status"] != "passed":
        raise SystemExit(f"error: {name} did not pass on the CPU: {steps[name]['reason']}")
    return steps[name]["seconds"]


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory(prefix="cpu-basis-") as work:
        # A cold compile cache, as a lent GPU machine has.
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TORCHINDUCTOR_CACHE_DIR": str(Path(work) / "inductor")}
        out = Path(work) / "check"
        run = measure("the CPU steps", ["bash", "bench/gpu_check.sh", str(out), "train_fp32",
                                        "bf16_predictions_match_fp32", "sigterm_resume"], env)
        for name in ("train_fp32", "bf16_predictions_match_fp32", "sigterm_resume"):
            results[name] = {**run, "seconds": step_seconds(out / "gpu_check.json", name)}
        for name, command in BASIS_COMMANDS.items():
            results[name] = measure(name, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *command],
                                    env)
    record = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
              "measured": time.strftime("%Y-%m-%d %H:%M"), "steps": results}
    path = REPO / CPU_BASIS_FILE
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{'work':<28} {'seconds':>8} {'load before/after':>18}")
    for name, entry in results.items():
        print(f"{name:<28} {entry['seconds']:>8.1f} {entry['load_before']:>9.2f} / {entry['load_after']:<6.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
