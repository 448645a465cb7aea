"""Every measurement runs in its own child process: a fresh interpreter, its own peak memory, its own log.

The parent (this module) writes a spec (JSON) and runs `python -m bench.child KIND SPEC_FILE` from the repository
root; the child (child.py) runs the worker of that kind (the tutorial loop, the Trainer, the tool, the matmul peak)
and writes its result dict to spec["result_file"]. The parent reaps the child with os.wait4, which gives the
child's own peak RSS and CPU seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, RowFailed


@dataclass
class ChildRun:
    """A finished child. A `load_before` above the thread count means other work competed for the cores (OpenMP
    threads then spin-wait: the child slows down many times over while its CPU seconds grow)."""

    returncode: int
    peak_rss_mb: float
    wall_seconds: float
    cpu_seconds: float
    load_before: float
    stdout: Path
    stderr: Path

    def last_error_line(self) -> str:
        """The child's last `error:`/`stopped:` line (the tool's own message), else its last stderr line."""
        lines = [line.strip() for line in self.stderr.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("error", "stopped", "[rank"))]
        return (errors or lines or [f"exit status {self.returncode}, no stderr"])[-1]


def child_env(threads: int, extra: dict | None = None) -> dict:
    """The environment of every child: offline, no W&B, the same thread count, the project importable, and one
    GPU (the first visible): on several, the Trainer would otherwise spread itself over all of them
    (DataParallel) while the other rows use one."""
    env = dict(os.environ)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="0" if visible is None else visible.split(",")[0],
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra or {})
    return env


def run_child(cmd: list[str], env: dict, log_stem: Path, timeout: float) -> ChildRun:
    """Run `cmd` from the repository root; reap it with os.wait4 to get its own peak RSS."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    stdout, stderr = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    load_before = os.getloadavg()[0]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return ChildRun(proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start,
                    usage.ru_utime + usage.ru_stime, load_before, stdout, stderr)


def run_python_worker(kind: str, spec: dict, log_stem: Path, timeout: float,
                      extra_env: dict | None = None) -> tuple[dict, ChildRun]:
    """Run the worker `kind` on `spec` in a child; its result dict and the child's record (RowFailed if the
    child failed)."""
    spec_file, result_file = log_stem.with_suffix(".spec.json"), log_stem.with_suffix(".result.json")
    spec = {**spec, "result_file": str(result_file)}
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2))
    result_file.unlink(missing_ok=True)
    child = run_child([sys.executable, "-m", "bench.child", kind, str(spec_file)],
                      child_env(spec["threads"], extra_env), log_stem, timeout)
    if child.returncode != 0 or not result_file.exists():
        raise RowFailed(child.last_error_line())
    return json.loads(result_file.read_text()), child
