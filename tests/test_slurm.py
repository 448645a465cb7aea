"""Real SLURM and real multi-node rendezvous, on this machine.

SLURM: launch/slurm/local_cluster.sh starts a one-node cluster here (munged, slurmctld and slurmd, node
`localhost` at 127.0.0.1, no cgroups) in a folder and on ports of the tests' own, and the project's sbatch files run
on it for real, on a CPU node: launch/slurm.sbatch trains what launch/cpu_debug.sh trains; a requeue (`scontrol
requeue`, or the warning signal SLURM sends before a time limit) stops the run with a checkpoint, and the requeued
job resumes it to the same weights, bit for bit; launch/sweeps/slurm_array.sbatch runs a study as an array job and
keeps it consistent when a task is cancelled. Each SLURM test skips with the cluster's own line where the cluster
cannot start (not root, no apt-get to install SLURM, a daemon that refuses).

Multi-node without SLURM: launch/multi_node.sh started twice here (two "nodes" of one CPU process each, meeting at
127.0.0.1) trains what two processes on one node train; a node killed mid-run ends the other with the launcher's
one line, and both restarted resume and finish.

Where a stop must land mid-run, the test holds the training process at its first logged step (SIGSTOP) and SLURM
lets it go on: it sends SIGCONT before the SIGTERM of a requeue or a cancel. Nothing here uses an address other
than 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT, SAMPLE_DIR, free_port, kill_tree, limit, read_jsonl, run_tool, start_tool, without_timing

from afqmc_dist.tiny_model import build_tiny_bert, vocab_from_files

LOCAL_CLUSTER = ROOT / "launch" / "slurm" / "local_cluster.sh"
SLURM_SBATCH = ROOT / "launch" / "slurm.sbatch"
ARRAY_SBATCH = ROOT / "launch" / "sweeps" / "slurm_array.sbatch"
QUICK_SWEEP = ROOT / "launch" / "sweeps" / "quick.yaml"
# The GPU lines of the sbatch files overridden on sbatch's command line (its options win over #SBATCH lines): one
# node, no GPU, one CPU per task (so that two jobs run side by side on a 2-core machine).
CPU_NODE = ["--nodes=1", "--gres=none", "--cpus-per-task=1"]
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE")
STOPPED = re.compile(r"^stopped: (?P<signal>SIG\w+) received: stopped after step (?P<step>\d+) and saved "
                     r"(?P<path>\S+); continue with --resume_from_checkpoint latest$", re.MULTILINE)
RESUMED = re.compile(r"^resumed from (?P<path>\S+): step (?P<step>\d+),", re.MULTILINE)
LAUNCHER_LINE = re.compile(r"^(\[rank \d+\] )?(error|stopped): ")


# --- the cluster --------------------------------------------------------------------------------------------------

class Cluster:
    """A running local cluster: its folder, and the environment its client commands (and jobs) need."""

    def __init__(self, folder: Path):
        self.folder = folder
        # sbatch hands the submitting environment on to the job (--export=ALL): the venv's python first on PATH,
        # no trace of a SLURM job this test might itself run in, and W&B off.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env.pop("OMP_NUM_THREADS", None)  # slurm.sbatch derives it from --cpus-per-task
        self.env = {**env, "SLURM_CONF": str(folder / "slurm.conf"), "WANDB_MODE": "disabled",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONFAULTHANDLER": "1"}

    def command(self, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), cwd=ROOT, env=self.env, capture_output=True, text=True,
                                timeout=limit(timeout))
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr.strip()}"
        return result

    def submit(self, script: Path, args: list, log: Path, *options: str, env: dict | None = None) -> str:
        """sbatch SCRIPT ARGS from the repo root, its log in LOG (appended to by a requeued job); the job id."""
        job_env = {**self.env, "ACCELERATE_USE_CPU": "1", "MAIN_PROCESS_PORT": str(free_port()), **(env or {})}
        result = subprocess.run(["sbatch", "--parsable", f"--output={log}", *options, str(script), *map(str, args)],
                                cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=limit(60))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); finished jobs stay for MinJobAge."""
        text = self.command("scontrol", "show", "job", "--oneliner", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))

    def completing(self, job: str) -> bool:
        """Whether processes of JOB are still ending (SLURM names a cancelled job CANCELLED at once)."""
        return bool(self.command("squeue", "--noheader", f"--jobs={job}", "--states=CG", "--format=%i").stdout.strip())

    def wait(self, job: str, log: Path, timeout: float = 240) -> dict[str, str]:
        """Wait until JOB has finished for good (a requeued job is pending again, not finished) and every process of
        it has ended; its record."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job))["JobState"] not in FINISHED or self.completing(job):
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job], env=self.env, capture_output=True)
                pytest.fail(f"job {job} still {info['JobState']} after {timeout} s; its log:\n{tail(log)}")
            time.sleep(0.5)
        return info


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.exists() else "(no log)"


def start_cluster() -> tuple[Cluster, dict]:
    """launch/slurm/local_cluster.sh start, in a new folder of its own and on free ports; the cluster and the
    script's environment. Skips the test with the script's own line where the cluster cannot start."""
    folder = Path(tempfile.mkdtemp(prefix="afqmc-slurm-"))  # short: munge's socket path must fit in 108 bytes
    env = {**os.environ, "AFQMC_SLURM_DIR": str(folder), "AFQMC_SLURMCTLD_PORT": str(free_port()),
           "AFQMC_SLURMD_PORT": str(free_port())}
    started = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], env=env, capture_output=True, text=True,
                             timeout=limit(900))
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        lines = started.stderr.strip().splitlines() or ["local_cluster.sh start failed without a word"]
        pytest.skip(f"no local SLURM cluster: {lines[-1]}")
    return Cluster(folder), env


def stop_cluster(cluster: Cluster, env: dict) -> subprocess.CompletedProcess:
    stopped = subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], env=env, capture_output=True, text=True,
                             timeout=limit(120))
    shutil.rmtree(cluster.folder, ignore_errors=True)
    return stopped


@pytest.fixture(scope="module")
def cluster():
    """A one-node SLURM cluster of the tests' own (folder, ports), started and finally stopped by
    launch/slurm/local_cluster.sh, which installs SLURM with apt-get where it is missing."""
    cluster, env = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster, env)


# --- runs and their processes ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quickstart_model(tmp_path_factory) -> Path:
    """The quick start's model, smaller: a random BERT (hidden 64, 2 layers) with the sample data's vocabulary."""
    path = tmp_path_factory.mktemp("quickstart-model")
    build_tiny_bert(str(path), vocab=vocab_from_files(sorted(str(p) for p in SAMPLE_DIR.glob("*.json"))),
                    hidden_size=64, num_layers=2, num_heads=2)
    return path


def quickstart_args(model: Path, out: Path, *extra) -> list:
    """The README's quick start (sample data, 20 epochs of batch 16 at 2e-3, train + test + predict), with best/
    picked by dev F1: the random model's accuracy peaks at the majority guess in epoch 1, its F1 late in the run,
    so that best/ comes from after a stop in the first epochs."""
    return ["--model_checkpoint", model, "--train_file", SAMPLE_DIR / "train.json",
            "--dev_file", SAMPLE_DIR / "dev.json", "--test_file", SAMPLE_DIR / "test.json", "--output_dir", out,
            "--do_train", "--do_test", "--do_predict", "--num_train_epochs", "20", "--batch_size", "16",
            "--learning_rate", "2e-3", "--metric_for_best_model", "f1", *extra]


def training_processes(*markers: str, env: dict | None = None) -> list[psutil.Process]:
    """The processes running train.py with every marker in their command line (and `env` in their environment):
    the training processes themselves, not the launchers or shells above them. Each one's `info["cmdline"]` is the
    command line that matched."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        words = process.info["cmdline"] or []
        if (any(w.endswith("train.py") for w in words) and "afqmc_dist.launcher" not in words
                and not os.path.basename(words[0]).startswith(("bash", "sh"))
                and all(any(m in w for w in words) for m in markers)):
            try:
                if env is None or all(process.environ().get(k) == v for k, v in env.items()):
                    found.append(process)
            except psutil.Error:
                continue
    return found


def pause_when_training(metrics: Path, *markers: str, env: dict | None = None,
                        timeout: float = 180) -> list[psutil.Process]:
    """Wait until the run writing METRICS (metrics.jsonl, written at its first logging step) trains, then stop its
    training processes (SIGSTOP) where they are; returns them (SLURM's SIGCONT or `resume()` lets them go on)."""
    deadline = time.monotonic() + timeout
    processes: list[psutil.Process] = []  # found while the run starts, to stop them the moment it trains
    while not metrics.exists():
        assert time.monotonic() < deadline, f"no training after {timeout} s ({metrics} never appeared)"
        processes = [p for p in processes if is_alive(p)] or training_processes(*markers, env=env)
        time.sleep(0.01)
    processes = [p for p in processes if is_alive(p)] or training_processes(*markers, env=env)
    for process in processes:
        process.suspend()
    assert processes, "the run trains, but no training process was found"
    return processes


def is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE  # a zombie has ended
    except psutil.NoSuchProcess:
        return False


def stops_and_resumes(log_text: str) -> list[int]:
    """The steps at which the job's attempts stopped with a checkpoint, each one checked to be where the next
    attempt resumed, in that order."""
    stops, resumes = list(STOPPED.finditer(log_text)), list(RESUMED.finditer(log_text))
    assert stops and len(stops) == len(resumes), log_text[-4000:]
    for i, (stop, resume) in enumerate(zip(stops, resumes)):
        assert stop.start() < resume.start() and (i + 1 == len(stops) or resume.start() < stops[i + 1].start())
        assert (resume["path"], resume["step"]) == (stop["path"], stop["step"])
    return [int(stop["step"]) for stop in stops]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(folder: Path, reference: Path) -> None:
    import torch

    mine, theirs = weights(folder), weights(reference)
    assert mine.keys() == theirs.keys()
    differ = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert not differ, f"{len(differ)} of {len(mine)} tensors differ, e.g. {differ[:3]}"


def results(out: Path, name: str = "results.json") -> dict:
    return json.loads((out / name).read_text(encoding="utf-8"))


# --- launch/slurm.sbatch on a CPU node ------------------------------------------------------------------------------

class Submitted:
    """A job submitted, to be waited for when its outputs are needed."""

    def __init__(self, cluster: Cluster, job: str, out: Path, log: Path):
        self.cluster, self.job, self.out, self.log = cluster, job, out, log

    def finished(self) -> Path:
        """Wait for the job; check that it ran once, to the end; its output folder."""
        info = self.cluster.wait(self.job, self.log)
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), tail(self.log)
        return self.out


@pytest.fixture(scope="module")
def uninterrupted_job(cluster, quickstart_model, tmp_path_factory) -> Submitted:
    """The quick start through `sbatch launch/slurm.sbatch` on the local cluster, start to end (submitted only)."""
    folder = tmp_path_factory.mktemp("sbatch-uninterrupted")
    out, log = folder / "out", folder / "job.log"
    return Submitted(cluster, cluster.submit(SLURM_SBATCH, quickstart_args(quickstart_model, out), log, *CPU_NODE),
                     out, log)


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_job) -> Path:
    """The output folder of that run, once it has ended."""
    return uninterrupted_job.finished()


def test_slurm_sbatch_on_a_cpu_node_trains_what_cpu_debug_trains(uninterrupted_job, quickstart_model, tmp_path):
    """launch/slurm.sbatch with ACCELERATE_USE_CPU=1, submitted with its GPU lines overridden (one node, no GPU, one
    CPU), runs one process on the CPU (one thread: its share of the task's CPUs) and writes the same results.json,
    test results and predictions as launch/cpu_debug.sh with the same flags on one thread."""
    out = tmp_path / "out"
    # Meanwhile the job runs on the other core.
    result = run_tool(quickstart_args(quickstart_model, out), script="cpu_debug.sh", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = uninterrupted_job.finished()

    for name in ("results.json", "test_results.json"):
        assert without_timing([results(uninterrupted, name)]) == without_timing([results(out, name)]), name
    assert read_jsonl(uninterrupted / "predictions.jsonl") == read_jsonl(out / "predictions.jsonl")
    config = results(uninterrupted, "run_config.json")
    assert (config["num_processes"], config["resume_from_checkpoint"]) == (1, "latest")  # the file always adds it


def test_scontrol_requeue_mid_run_stops_with_a_checkpoint_and_the_requeued_job_resumes_to_the_same_weights(
        cluster, quickstart_model, uninterrupted, tmp_path):
    """`scontrol requeue JOB` while the run trains: SLURM sends SIGTERM to every process of the job; the run
    finishes its step, saves a checkpoint and ends with status 3 (the tool's `stopped:` line in the job's log, to
    which the requeued job appends); SLURM starts the job again, whose run resumes from that checkpoint (the file
    always passes --resume_from_checkpoint latest) and ends with best/ equal, tensor for tensor, to an
    uninterrupted run's."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    job = cluster.submit(SLURM_SBATCH, quickstart_args(quickstart_model, out), log, *CPU_NODE)
    pause_when_training(out / "metrics.jsonl", str(out))
    cluster.command("scontrol", "requeue", job)
    info = cluster.wait(job, log)

    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), tail(log)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "DUE TO JOB REQUEUE" in text  # slurmstepd's own line: the first attempt was ended by the requeue
    (stopped_at,) = stops_and_resumes(text)
    assert results(out)["best_step"] > stopped_at  # best/ comes from the resumed attempt
    assert without_timing([results(out)]) == without_timing([results(uninterrupted)])
    assert_same_weights(out / "best", uninterrupted / "best")


def test_the_time_limits_warning_stops_the_run_with_a_checkpoint_and_the_requeued_job_resumes_to_the_same_weights(
        cluster, quickstart_model, uninterrupted, tmp_path):
    """A real time limit with the file's warning (`--time=1 --signal=B:USR1@10` here): SLURM sends SIGUSR1 to
    the batch script, which passes it through srun to the run (srun would answer a SIGTERM by killing it), waits
    while the run saves a checkpoint and ends with status 3, and requeues the job; the requeued job resumes and ends
    with an uninterrupted run's weights. SLURM looks at time limits every 30 s, so the warning comes 20 to 50 s
    into the job: the run is held at its first logged step until it has come."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    job = cluster.submit(SLURM_SBATCH, quickstart_args(quickstart_model, out), log, *CPU_NODE,
                         "--time=1", "--signal=B:USR1@10")
    paused = pause_when_training(out / "metrics.jsonl", str(out))
    deadline = time.monotonic() + 90
    # The attempt held has been warned once the script has said so more often than it has requeued the job.
    while (text := tail(log, 10**7)).count("the job ends soon") <= text.count("slurm.sbatch: requeued job"):
        assert time.monotonic() < deadline, f"no warning 90 s into the job:\n{tail(log)}"
        time.sleep(0.2)
    for process in paused:
        process.resume()
    info = cluster.wait(job, log)

    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)
    text = log.read_text(encoding="utf-8", errors="replace")
    # Every attempt but the last was stopped by its warning and requeued by the script: one, unless the machine is
    # so slow that the warning came while an attempt was still starting (nothing to save) or that the resumed
    # attempt met its own warning too. Each stop during training saved a checkpoint the next attempt resumed from.
    assert len(re.findall(r"^stopped: ", text, re.MULTILINE)) == text.count("slurm.sbatch: requeued job") \
        == int(info["Restarts"]) >= 1
    stops_and_resumes(text)
    assert STOPPED.search(text)["signal"] == "SIGUSR1"
    assert without_timing([results(out)]) == without_timing([results(uninterrupted)])
    assert_same_weights(out / "best", uninterrupted / "best")


# --- launch/sweeps/slurm_array.sbatch ---------------------------------------------------------------------------------

def small_sweep(folder: Path, model: Path, n_trials: int) -> Path:
    """launch/sweeps/quick.yaml made test-sized: the quick-start model, 45 steps a run, one seed, a fast heartbeat."""
    sweep = yaml.safe_load(QUICK_SWEEP.read_text(encoding="utf-8"))
    sweep["base"].update(model_checkpoint=str(model), num_train_epochs=3, batch_size=16, eval_steps=5,
                         logging_steps=1, checkpointing_steps="5", cache_dir="none")
    sweep["search_space"] = {k: sweep["search_space"][k] for k in ("learning_rate", "warmup_proportion")}
    sweep.update(n_trials=n_trials, seeds=[1], heartbeat_interval=1, grace_period=2, pruner="none")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep), encoding="utf-8")
    return path


@pytest.fixture
def optuna():
    return pytest.importorskip("optuna", reason="sweeps need optuna, which is not installed")


def study_trials(sweep_dir: Path) -> list:
    import optuna

    name = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))["study_name"]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}").get_trials()


def states(trials) -> list[str]:
    return sorted(t.state.name for t in trials if "unneeded" not in t.user_attrs)


def submit_array(cluster: Cluster, sweep_file: Path, sweep_dir: Path, logs: Path) -> str:
    # One thread per run: the two tasks share the 2 cores.
    return cluster.submit(ARRAY_SBATCH, [sweep_file, sweep_dir], logs / "task-%a.log", "--array=0-1", *CPU_NODE,
                          env={"OMP_NUM_THREADS": "1"})


def test_an_array_of_two_tasks_finishes_a_study_with_its_trial_count_each_trial_run_once(
        optuna, cluster, quickstart_model, tmp_path):
    """`sbatch --array=0-1 launch/sweeps/slurm_array.sbatch SWEEP.yaml SWEEP_DIR`: two workers of one study
    (SQLite in SWEEP_DIR, one node), each naming itself after its task, finish it with its trials, each run once."""
    sweep_dir = tmp_path / "sweep"
    job = submit_array(cluster, small_sweep(tmp_path, quickstart_model, n_trials=2), sweep_dir, tmp_path)
    tasks = [cluster.wait(f"{job}_{task}", tmp_path / f"task-{task}.log") for task in (0, 1)]

    assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("COMPLETED", "0:0")] * 2, tail(tmp_path / "task-1.log")
    trials = study_trials(sweep_dir)
    assert states(trials) == ["COMPLETE", "COMPLETE"]
    folders = [sweep_dir / t.user_attrs["folder"] for t in trials if t.state.name == "COMPLETE"]
    assert len(set(folders)) == 2
    for folder in folders:
        assert (folder / "seed-1.log").read_text(encoding="utf-8").count("==== ") == 1  # run once
        assert results(folder / "seed-1")["dev_f1"] is not None
    for task in (0, 1):
        assert f"[worker {task + 1}]" in (tmp_path / f"task-{task}.log").read_text(encoding="utf-8")


def test_a_cancelled_array_task_leaves_its_trial_queued_again_and_a_rerun_finishes_the_study(
        optuna, cluster, quickstart_model, tmp_path):
    """scancel of one task while its trial trains (held at its first step while the other task finishes its own
    trial and ends): its run saves a checkpoint, the trial is queued again and nothing is counted twice; the same
    array submitted again resumes that trial from its checkpoint and ends the study with its trial count."""
    sweep_file, sweep_dir = small_sweep(tmp_path, quickstart_model, n_trials=2), tmp_path / "sweep"
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    first.mkdir()
    rerun.mkdir()
    job = submit_array(cluster, sweep_file, sweep_dir, first)
    deadline = time.monotonic() + 180
    while not (held := training_processes(str(sweep_dir), env={"SLURM_ARRAY_TASK_ID": "1"})):
        assert time.monotonic() < deadline and cluster.job(f"{job}_1")["JobState"] not in FINISHED, \
            f"task 1 never started a run:\n{tail(first / 'task-1.log')}"
        time.sleep(0.01)
    (run,) = held
    # The trial's run options (seed-1.yaml), from the command line that matched: read again, it can be empty for an
    # instant while the sweep's watcher wrapper execs into the run (the kernel swaps in the new arguments last).
    config = Path(next(w for w in run.info["cmdline"] if w.endswith(".yaml")))
    pause_when_training(config.with_suffix("") / "metrics.jsonl", str(sweep_dir), env={"SLURM_ARRAY_TASK_ID": "1"})
    assert cluster.wait(f"{job}_0", first / "task-0.log")["JobState"] == "COMPLETED"
    cluster.command("scancel", f"{job}_1")
    cancelled = cluster.wait(f"{job}_1", first / "task-1.log")

    assert cancelled["JobState"] == "CANCELLED"
    worker_log = (first / "task-1.log").read_text(encoding="utf-8")
    stop = re.search(r"stopped after step (\d+) and saved (\S+); .*\); the trial is queued again$", worker_log,
                     re.MULTILINE)
    assert stop, worker_log
    trials = study_trials(sweep_dir)
    # One trial complete, the cancelled one failed and queued again (a new trial waiting in the same folder).
    assert states(trials) == ["COMPLETE", "FAIL", "WAITING"], [(t.number, t.state.name) for t in trials]
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.user_attrs["folder"] == str(config.parent.relative_to(sweep_dir))

    job = submit_array(cluster, sweep_file, sweep_dir, rerun)
    tasks = [cluster.wait(f"{job}_{task}", rerun / f"task-{task}.log") for task in (0, 1)]
    assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("COMPLETED", "0:0")] * 2
    trials = study_trials(sweep_dir)
    assert states(trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    (retried,) = [t for t in trials if t.state.name == "COMPLETE" and t.system_attrs.get("failed_trial") is not None]
    assert retried.system_attrs["failed_trial"] == failed.number and retried.params == failed.params
    attempts = (config.parent / "seed-1.log").read_text(encoding="utf-8").split("==== ")[1:]
    assert len(attempts) == 2 and f"resumed from {stop[2]}: step {stop[1]}," in attempts[1]


# --- launch/multi_node.sh: two "nodes" on this machine ------------------------------------------------------------

@pytest.fixture(scope="module")
def dropout_free_model(tmp_path_factory) -> Path:
    """The quick-start model without dropout: 2 processes on one node or on two compute the same thing."""
    path = tmp_path_factory.mktemp("model-no-dropout")
    build_tiny_bert(str(path), vocab=vocab_from_files(sorted(str(p) for p in SAMPLE_DIR.glob("*.json"))),
                    hidden_size=64, num_layers=2, num_heads=2, dropout=0.0)
    return path


def two_process_args(model: Path, out: Path, *extra) -> list:
    return ["--model_checkpoint", model, "--train_file", SAMPLE_DIR / "train.json",
            "--dev_file", SAMPLE_DIR / "dev.json", "--predict_file", SAMPLE_DIR / "dev.json", "--output_dir", out,
            "--do_train", "--do_predict", "--num_train_epochs", "6", "--global_batch_size", "16",
            "--learning_rate", "2e-3", "--metric_for_best_model", "f1", *extra]


def start_nodes(args: list) -> list[subprocess.Popen]:
    """launch/multi_node.sh on "node" 0 and 1 of 2, one CPU process each, meeting at 127.0.0.1 (gloo there too)."""
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "NUM_MACHINES": "2", "GPUS_PER_NODE": "1",
           "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    return [start_tool(args, script="multi_node.sh", env={**env, "MACHINE_RANK": str(rank)}) for rank in (0, 1)]


def finish(nodes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    ended = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=limit(timeout))
        except subprocess.TimeoutExpired:
            for other in nodes:
                kill_tree(other.pid)
            pytest.fail(f"a node still running after {timeout} s:\n{node.communicate()[1][-3000:]}", pytrace=False)
        ended.append((node.returncode, out, err))
    return ended


def logits(model_dir: Path, rows: list[dict]):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        enc = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True,
                        return_tensors="pt")
        return model(**enc).logits


@pytest.fixture(scope="module")
def two_nodes(dropout_free_model, tmp_path_factory) -> Path:
    """The run on two "nodes" of one process each, uninterrupted: its output folder."""
    out = tmp_path_factory.mktemp("two-nodes") / "out"
    ended = finish(start_nodes(two_process_args(dropout_free_model, out)))
    assert [status for status, _, _ in ended] == [0, 0], ended[0][2][-3000:] + ended[1][2][-3000:]
    return out


def test_two_nodes_of_one_process_train_what_two_processes_on_one_node_train(two_nodes, dropout_free_model,
                                                                           tmp_path):
    """launch/multi_node.sh on two "nodes" (MACHINE_RANK 0 and 1, one CPU process each over gloo, rendezvous at
    127.0.0.1) and launch/cpu_debug_2proc.sh (two processes, one node) with the same global batch and no dropout:
    the same dev metrics, predictions and logits, and the same weights but for the attention key biases (their
    gradient is zero in exact arithmetic: what they get is rounding noise, which Adam scales up)."""
    import torch

    out = tmp_path / "out"
    result = run_tool(two_process_args(dropout_free_model, out), script="cpu_debug_2proc.sh")
    assert result.returncode == 0, result.stderr[-3000:]

    assert results(two_nodes, "run_config.json")["num_processes"] == results(out, "run_config.json")["num_processes"]
    ours, theirs = (without_timing([results(folder)])[0] for folder in (two_nodes, out))
    assert ours.pop("dev_loss") == pytest.approx(theirs.pop("dev_loss"), abs=1e-6) and ours == theirs
    assert read_jsonl(two_nodes / "predictions.jsonl") == read_jsonl(out / "predictions.jsonl")
    rows = read_jsonl(SAMPLE_DIR / "dev.json")
    assert torch.allclose(logits(two_nodes / "best", rows), logits(out / "best", rows), atol=1e-5, rtol=0)
    mine, theirs = weights(two_nodes / "best"), weights(out / "best")
    for name in mine:
        if not name.endswith("attention.self.key.bias"):
            assert torch.allclose(mine[name], theirs[name], atol=1e-5, rtol=0), name


def test_a_killed_node_ends_the_other_with_the_launchers_line_and_both_restarted_resume_and_finish(
        two_nodes, dropout_free_model, tmp_path):
    """SIGKILL to every process of node 1 mid-run (a node lost): node 0 ends with a non-zero status of the tool's
    table and the launcher's one line last on stderr, no traceback. Both nodes started again with
    --resume_from_checkpoint latest resume from the last checkpoint and finish with the uninterrupted run's best/."""
    out = tmp_path / "out"
    args = two_process_args(dropout_free_model, out, "--checkpointing_steps", "5")
    nodes = start_nodes(args)
    # Node 0's process held mid-run (after step 10, the first logged one: step_5 is saved), node 1 killed, node 0
    # let go on.
    rank_0 = pause_when_training(out / "metrics.jsonl", str(out), env={"RANK": "0"})
    assert [p.name for p in (out / "checkpoints").glob("step_*")]
    kill_tree(nodes[1].pid, signal.SIGKILL)
    for process in rank_0:
        process.resume()
    (status, _, stderr), _ = finish(nodes)

    assert status in (1, 2, 3, 4, 5, 130), stderr[-3000:]  # errors.py's statuses, 0 excepted
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert LAUNCHER_LINE.match(lines[-1]) and "Traceback" not in stderr, stderr[-3000:]

    ended = finish(start_nodes([*args, "--resume_from_checkpoint", "latest"]))
    assert [status for status, _, _ in ended] == [0, 0], ended[0][2][-3000:] + ended[1][2][-3000:]
    assert RESUMED.search(ended[0][1] + ended[0][2])
    assert_same_weights(out / "best", two_nodes / "best")


# --- local_cluster.sh itself ------------------------------------------------------------------------------------------

def cluster_processes(cluster: Cluster, job: str) -> list[psutil.Process]:
    """The cluster's daemons (a log file of its folder open) and the processes of JOB."""
    found = []
    for process in psutil.process_iter():
        try:
            if (any(f.path.startswith(str(cluster.folder)) for f in process.open_files())
                    or process.environ().get("SLURM_JOB_ID") == job):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_status_says_up_and_stop_leaves_nothing_of_the_cluster_running(tmp_path):
    """`status` exits 0 and says "up" while the cluster takes jobs; `stop` ends the daemons and the processes of
    a job still running, after which `status` exits 1 and says why. (A cluster of this test's own.)"""
    cluster, env = start_cluster()
    try:
        status = subprocess.run(["bash", str(LOCAL_CLUSTER), "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and "up:" in status.stdout, status.stderr
        script = tmp_path / "sleeper.sh"
        script.write_text("#!/bin/bash\nsrun sleep 300\n", encoding="utf-8")
        job = cluster.submit(script, [], tmp_path / "sleeper.log", "--cpus-per-task=1")
        deadline = time.monotonic() + 60
        while not any(p.name() == "sleep" for p in cluster_processes(cluster, job)):
            assert time.monotonic() < deadline, tail(tmp_path / "sleeper.log")
            time.sleep(0.2)
        running = cluster_processes(cluster, job)
        assert {"munged", "slurmctld", "slurmd", "slurmstepd", "sleep"} <= {p.name() for p in running}

        stop = subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], env=env, capture_output=True, text=True,
                              timeout=limit(120))
        assert stop.returncode == 0, stop.stderr
        assert [(p.pid, p.name()) for p in running if is_alive(p)] == []
        status = subprocess.run(["bash", str(LOCAL_CLUSTER), "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 1 and "down:" in status.stderr, status.stdout
    finally:
        stop_cluster(cluster, env)
