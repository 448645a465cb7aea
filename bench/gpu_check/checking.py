"""The machinery of `bench/gpu_check.sh`: steps, commands with time limits, and what a step may raise.

A step is a function of a `Check` that returns its numbers, or raises `Skipped` (it cannot run here) or `Failed`
(it ran and something was wrong). It runs commands through `Check.command` / `Check.start`: every command's
output goes to the check's log as it comes, and no command outlives the time limit of its step (its whole
process tree is killed at the limit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO

POLL = 0.05


class Skipped(Exception):
    """The step cannot run here; the message says why."""


class Failed(Exception):
    """The step ran and something was wrong; the message says what, `numbers` what was measured before."""

    def __init__(self, message: str, numbers: dict | None = None):
        super().__init__(message)
        self.numbers = numbers or {}


# A step's time limit is derived, not guessed: the seconds its work took on the 2-core CPU machine the project is
# developed on (the step itself where it runs on a CPU, else the same work there: `basis` says which; see
# limits.py), times SAFETY, plus CUDA_START for each process the step starts (CUDA context, cuBLAS/cuDNN handles;
# NCCL with 2 GPUs). A step that compiles (torch.compile) is given COMPILE_FACTOR instead of SAFETY: its CPU time is
# mostly inductor compiling C++, and Triton compiling GPU kernels takes as long again at most. The tiny models of
# the check train no faster on a GPU than on the CPU (too small to keep it busy), so the CPU time bounds the GPU's.
SAFETY = 1.5
COMPILE_FACTOR = 2.0
CUDA_START = 15.0


@dataclass
class Step:
    name: str
    needs: str  # "any" (runs on a CPU too), "gpu" or "2 gpus"
    what: str  # one line for the report
    run: object  # function(check) -> dict of numbers
    part: int  # which call of the check runs it (bash bench/gpu_check.sh OUT --part N)
    cpu_seconds: float  # its work, measured on the CPU
    basis: str  # what was measured
    processes: int = 1  # processes it starts (each pays CUDA_START)
    compiles: bool = False

    @property
    def timeout(self) -> float:
        """Seconds for the whole step, every command in it included."""
        return round(self.cpu_seconds * (COMPILE_FACTOR if self.compiles else SAFETY) + CUDA_START * self.processes)


class Steps(list):
    """The steps of a module, in the order they are defined: `@steps.add(name, needs, what, part=..., ...)`."""

    def add(self, name: str, needs: str, what: str, **limits):
        def register(function):
            self.append(Step(name, needs, what, function, **limits))
            return function
        return register


@dataclass
class Finished:
    """A command that ended: its exit status (None when it was killed at its time limit), output, seconds."""

    returncode: int | None
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def last_line(self) -> str:
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        return lines[-1][:300] if lines else "no output"


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc: torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def send(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Running:
    """A command started by `Check.start`: its output goes to the check's log as it comes."""

    def __init__(self, check: Check, command: list[str], env: dict | None):
        self.check = check
        check.say(f"$ {' '.join(map(str, command))}")
        self.offset = check.log_path.stat().st_size
        self.started = time.monotonic()
        self.process = subprocess.Popen([str(c) for c in command], cwd=REPO, env={**check.env, **(env or {})},
                                        stdout=check.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until(self, condition, timeout: float) -> bool:
        """Poll `condition()` while the command runs; True once it holds, False if the command ended or
        `timeout` (clipped to the step's limit) passed first."""
        end = time.monotonic() + self.check.clip(timeout)
        while time.monotonic() < end and self.process.poll() is None:
            if condition():
                return True
            time.sleep(POLL)
        return bool(condition())

    def signal(self, sig: int, pids: list[int] | None = None) -> None:
        """Send `sig` to `pids` (default: the command's own process, e.g. the launcher)."""
        self.check.say(f"\n# sending {signal.Signals(sig).name} to {pids or [self.process.pid]}")
        send(pids or [self.process.pid], sig)

    def kill(self) -> None:
        """SIGKILL the command's whole process tree at once."""
        send(process_tree(self.process.pid), signal.SIGKILL)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None = None) -> Finished:
        """Wait for the end (killing the tree at `timeout`, clipped to the step's limit); then end anything the
        command left behind in its process group."""
        try:
            returncode = self.process.wait(self.check.clip(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
            returncode = None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        seconds = time.monotonic() - self.started
        self.check.log_file.flush()
        with open(self.check.log_path, encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            output = f.read()
        ending = "killed at its time limit" if returncode is None else f"exit status {returncode}"
        self.check.say(f"# {ending} after {seconds:.1f} s")
        return Finished(returncode, output, seconds)


@dataclass
class Check:
    """What every step gets: the machine, a scratch folder, the log, the clocks, and what earlier steps left."""

    work: Path
    log_path: Path
    machine: dict
    env: dict
    deadline: float  # time.monotonic() at which the whole check must be over
    step_deadline: float = 0.0
    shared: dict = field(default_factory=dict)  # results one step leaves for a later one
    log_file: object = None

    @property
    def cuda(self) -> bool:
        return self.machine.get("gpu_count", 0) > 0

    def earlier(self, step: str, what: str):
        """What step `step` left for later ones, or Skipped saying this step needs `what` of it."""
        if step not in self.shared:
            raise Skipped(f"needs {step}'s {what} ({step} did not pass)")
        return self.shared[step]

    def say(self, message: str) -> None:
        self.log_file.write(message + "\n")
        self.log_file.flush()

    def clip(self, timeout: float | None) -> float:
        """`timeout`, cut to what is left of the current step's time."""
        left = max(0.0, self.step_deadline - time.monotonic())
        return left if timeout is None else min(timeout, left)

    def start(self, command: list, env: dict | None = None) -> Running:
        return Running(self, command, env)

    def command(self, command: list, env: dict | None = None, timeout: float | None = None) -> Finished:
        return self.start(command, env).wait(timeout)

    def expect(self, done: Finished, status: int, what: str) -> None:
        """Failed unless `done` ended with `status`."""
        if done.timed_out:
            raise Failed(f"{what}: still running at the step's time limit (killed)")
        if done.returncode != status:
            raise Failed(f"{what}: exit status {done.returncode}, expected {status}: {done.last_line()}")
