"""One seed of a sweep trial: a full training run of the tool, started through the sweep's launcher.

Each seed run owns a folder and leaves these beside it, in SWEEP_DIR/trials/NNNN/ (NNNN: the trial's number, or
for a retried trial the number of the trial it retries, so that a retry finds its predecessor's checkpoints):

    seed-S/         the run's --output_dir (best/, results.json, metrics.jsonl, checkpoints/, tensorboard/, ...)
    seed-S.yaml     the run's options, given to the launcher as `--config seed-S.yaml`
    seed-S.log      the run's stdout and stderr (appended by each attempt)
    seed-S.json     how it ended: {"seed", "status", "line", "value", "seconds", "params", "results"}
    trial.json      the study the folder belongs to ({"study", "study_uid", "slot"}): a folder of another study,
                    or of one that is gone, is never resumed as this study's (study.py)

Every run passes `--resume_from_checkpoint latest`: a retried seed continues from its last checkpoint (a fresh
run starts afresh). A seed whose seed-S.json says it finished (status 0) with the same options is not run again.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import string
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import yaml

from ..errors import EXIT_INTERNAL, EXIT_OK, EXIT_STOPPED, STATUS_DIR_ENV, UserError, mask_secrets
from ..files import atomic_open
from ..launcher import free_port
from ..outputs import RESULTS
from ..preemption import STOP_SIGNALS

TRIALS, TRIAL_JSON = "trials", "trial.json"
# Run in front of the launcher: the run gets SIGTERM when its worker dies (SIGKILL, the OOM killer), so that it
# saves a checkpoint and frees its folder for the retry instead of training on unobserved (Linux; the kernel keeps
# PR_SET_PDEATHSIG across exec).
_WATCHED = ("import ctypes, os, signal, sys\n"
            "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
            "if os.getppid() != int(sys.argv[1]):\n"
            "    sys.exit(3)  # the worker was gone before prctl\n"
            "os.execvp(sys.argv[2], sys.argv[2:])\n")


def trial_dir(sweep_dir: str, slot: int) -> str:
    return os.path.join(sweep_dir, TRIALS, f"{slot:04d}")


def _identity(study_name: str, uid: str, slot: int) -> dict:
    return {"study": study_name, "study_uid": uid, "slot": slot}


def claim_trial_dir(sweep_dir: str, slot: int, study_name: str, uid: str) -> str:
    """SWEEP_DIR/trials/NNNN for the trial in `slot` of the study with id `uid`: made (with its trial.json), or
    checked to be that trial's. UserError for a folder of another study: its checkpoints are not this trial's."""
    folder = trial_dir(sweep_dir, slot)
    expected = _identity(study_name, uid, slot)
    if os.path.isdir(folder):
        _check_identity(folder, expected)
        return folder
    os.makedirs(folder)
    with atomic_open(os.path.join(folder, TRIAL_JSON)) as f:
        json.dump(expected, f)
    return folder


def check_trial_folders(sweep_dir: str, study_name: str, uid: str) -> None:
    """Every trial folder in SWEEP_DIR belongs to this study (see `claim_trial_dir`), or UserError."""
    root = os.path.join(sweep_dir, TRIALS)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.isdigit():
            _check_identity(os.path.join(root, name), _identity(study_name, uid, int(name)))


def _check_identity(folder: str, expected: dict) -> None:
    try:
        with open(os.path.join(folder, TRIAL_JSON), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = None
    if recorded != expected:
        whose = "no study" if recorded is None else f"study {recorded.get('study')!r} (id {recorded.get('study_uid')})"
        raise UserError(f"{folder} holds the runs of {whose}, not of trial {expected['slot']} of study "
                        f"{expected['study']!r} (id {expected['study_uid']}): they would be resumed as this "
                        "trial's; use a new sweep folder")


@dataclass
class SeedResult:
    seed: int
    status: int  # the run's exit status (errors.py): 0 done, 1 NaN, 2 bad input, 3 stopped, 4 unexpected, 5 pruned
    line: str | None  # the run's last line (error:/stopped:), if any
    value: float | None  # the objective's dev metric of the best evaluation (status 0)
    seconds: float
    params: dict
    results: dict

    def write(self, path: str) -> None:
        with atomic_open(path) as f:
            json.dump(asdict(self), f, ensure_ascii=False, allow_nan=False, indent=1)


def finished_seed(folder: str, params: dict) -> SeedResult | None:
    """The record of a seed run that an earlier attempt of this trial finished (status 0, same options)."""
    try:
        with open(f"{folder}.json", encoding="utf-8") as f:
            record = SeedResult(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    return record if record.status == EXIT_OK and record.params == params else None


def run_seed(launcher: list[str], options: dict, folder: str, metric: str, params: dict, env: dict,
             started) -> SeedResult:
    """Run one seed's training (options -> FOLDER.yaml, output in FOLDER) through `launcher` and wait for it.

    `env` is added to the run's environment; `$NAME` in the launcher's words is replaced from it (so
    `--main_process_port $MAIN_PROCESS_PORT` gets a free port for each run). `started(process)` is called with
    the process once it runs (the worker passes stop signals to it), and `started(None)` when it has ended.
    """
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    config_path, status_dir = f"{folder}.yaml", f"{folder}.status"
    with atomic_open(config_path) as f:
        yaml.safe_dump(options, f, allow_unicode=True, sort_keys=False)
    os.makedirs(status_dir, exist_ok=True)
    for old in glob.glob(os.path.join(status_dir, "rank*.json")):
        os.remove(old)

    env = {**os.environ, "MAIN_PROCESS_PORT": str(free_port()), **env, STATUS_DIR_ENV: status_dir}
    command = [string.Template(word).safe_substitute(env) for word in launcher] + ["--config", config_path]
    if sys.platform.startswith("linux"):
        command = [sys.executable, "-c", _WATCHED, str(os.getpid()), *command]
    began = time.time()
    with open(f"{folder}.log", "a", encoding="utf-8") as log:
        shown = mask_secrets(shlex.join(command[-(len(launcher) + 2):]))
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown}\n")
        log.flush()
        # Its own session: a Ctrl-C in the worker's terminal reaches the worker only, which passes it on once.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started(process)
        try:
            returncode = process.wait()
        finally:
            started(None)
    status, line = _outcome(status_dir, returncode, f"{folder}.log")
    results, value = {}, None
    if status == EXIT_OK:
        try:
            with open(os.path.join(folder, RESULTS), encoding="utf-8") as f:
                results = json.load(f)
            value = float(results[f"dev_{metric}"])
        except (OSError, ValueError, KeyError, TypeError):
            status, line = EXIT_INTERNAL, f"the run ended with status 0 but {folder}/{RESULTS} has no dev_{metric}"
    result = SeedResult(options["seed"], status, line, value, round(time.time() - began, 1), params, results)
    result.write(f"{folder}.json")
    return result


def _outcome(status_dir: str, returncode: int, log_path: str) -> tuple[int, str | None]:
    """The run's own exit status and last line: from the processes' status files (errors.py writes them; a plain
    `accelerate launch` exits 1 whatever its processes' statuses were), else from the launcher's exit code."""
    records = []
    for path in glob.glob(os.path.join(status_dir, "rank*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            continue
    records.sort(key=lambda r: r.get("rank", 0))
    failing = [r for r in records if r.get("status")]
    if records and (failing or returncode == 0):
        chosen = next((r for r in failing if r.get("rank") == 0), failing[0] if failing else records[0])
        line = chosen.get("line") or next((r["line"] for r in records if r.get("line")), None)
        return int(chosen["status"]), line
    if -returncode in STOP_SIGNALS:
        # Stopped in its first moments, before Python had set up its handlers (errors.stop_while_starting): a
        # stop all the same, so the trial is queued again rather than failed.
        return EXIT_STOPPED, f"stopped: {signal.Signals(-returncode).name} ended the run before it could handle it"
    if returncode < 0:
        return EXIT_INTERNAL, f"the run was killed by {signal.Signals(-returncode).name}"
    return returncode, _last_line(log_path)


def _last_line(log_path: str) -> str | None:
    """The last `error:` / `stopped:` line of a run's log."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read()[-20000:].splitlines()
    except OSError:
        return None
    return next((line.strip() for line in reversed(lines) if "error:" in line or line.startswith("stopped:")),
                None)
