"""The launch layer: accelerate_config.yaml and the wrappers in launch/.

Every script ends in `python -m afqmc_dist.launcher` (accelerate's launch, ending with the tool's own line and
exit status). The CPU scripts run for real in test_launcher.py (a bad input file, SIGTERM, a NaN stop, a killed
process, Ctrl-C in a terminal) and elsewhere: `cpu_debug.sh` in test_readme.py, `cpu_debug_2proc.sh` in
test_distributed.py, `bf16.sh` in test_training.py. GPUs and SLURM do not exist on a CPU machine, so every
script also runs here against stand-ins for `python` (which answers torch's GPU
count and records the launch), `nvidia-smi`, `srun` and `scontrol` on a PATH holding only those and a few
coreutils: the tests see the exact command line each script would run, from which directory, with which
environment, and that the script passes the launcher's status and a SIGTERM through. The sharded-training configs
(FSDP, DeepSpeed) are loaded with accelerate's own loader, and launched for real to show that a CPU launch of them
is refused in one line instead of silently training unsharded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, limit
from test_launcher import error_lines, last_line

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
CONFIG = ROOT / "accelerate_config.yaml"
EXPECTED = ["bf16.sh", "cpu_debug.sh", "cpu_debug_2proc.sh", "fp16.sh", "multi_gpu.sh", "multi_node.sh",
            "sharded.sh", "single_gpu.sh", "slurm.sbatch"]
SHARDED_CONFIGS = {"fsdp": LAUNCH / "fsdp.yaml", "deepspeed": LAUNCH / "deepspeed.yaml"}
SCRIPTS = [LAUNCH / name for name in EXPECTED]
# Arguments for train.py, including ones a careless wrapper would split or drop.
USER_ARGS = ["--output_dir", "dir with space", "--run_name=a b", "--do_train"]
MULTI_NODE_ENV = {"NUM_MACHINES": "2", "MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.0.0.1", "GPUS_PER_NODE": "8"}


# --- accelerate_config.yaml -------------------------------------------------------------------------------

def test_config_loads_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    for cfg in (load_config_from_file(str(CONFIG)), ClusterConfig.from_yaml_file(str(CONFIG))):
        assert isinstance(cfg, ClusterConfig)  # an unknown key would have raised ValueError
        assert cfg.distributed_type is DistributedType.NO
        assert cfg.mixed_precision == "no" and isinstance(cfg.mixed_precision, str)
        assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank, cfg.use_cpu) == (1, 1, 0, False)


def test_config_quotes_no_values():
    """Bare `NO` / `no` are YAML booleans (and accelerate loads False without complaint): they must be strings."""
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert raw["distributed_type"] == "NO"
    assert raw["mixed_precision"] == "no"
    assert raw["downcast_bf16"] == "no"


def test_sharded_configs_load_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    fsdp, deepspeed = (load_config_from_file(str(path)) for path in SHARDED_CONFIGS.values())
    assert isinstance(fsdp, ClusterConfig) and isinstance(deepspeed, ClusterConfig)
    assert fsdp.distributed_type is DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "BertLayer"  # the layer class of BERT models
    assert deepspeed.distributed_type is DistributedType.DEEPSPEED and deepspeed.deepspeed_config["zero_stage"] == 2
    for cfg in (fsdp, deepspeed):
        assert cfg.mixed_precision == "no" and cfg.use_cpu is False


@pytest.mark.parametrize(("cpu_flag", "message"), [
    ("1", "the accelerate config asks for FSDP, but accelerate set up MULTI_CPU"),
    (None, "the launcher started 2 processes but accelerate connected 1"),
])
def test_an_fsdp_launch_on_a_cpu_is_refused_instead_of_training_unsharded(tmp_path, cpu_flag, message):
    """accelerate 1.15 shards across GPUs only: with ACCELERATE_USE_CPU=1 it falls back to DDP without a word,
    and without it (no GPU) it starts unconnected processes that would each train and write on their own."""
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "MAIN_PROCESS_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_flag:
        env["ACCELERATE_USE_CPU"] = cpu_flag
    test_file = tmp_path / "test.json"
    test_file.write_text('{"sentence1": "花呗", "sentence2": "借呗", "label": "0"}\n', encoding="utf-8")
    result = subprocess.run(["bash", str(LAUNCH / "sharded.sh"), "--test_file", str(test_file),
                             "--output_dir", str(tmp_path / "out"), "--do_test"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=limit(120))

    assert result.returncode == 2, result.stderr[-3000:]
    # Each rank raises the same error; the launcher prints the first one written, once, last.
    assert error_lines(result.stderr) == [last_line(result.stderr)], result.stderr[-3000:]
    assert re.match(r"\[rank [01]\] error: ", last_line(result.stderr)) and message in last_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- the scripts, statically ------------------------------------------------------------------------------

def test_all_scripts_exist_and_are_executable():
    assert sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch")) == EXPECTED
    for script in SCRIPTS:
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_passes_arguments_through_to_train_py(script):
    text = script.read_text(encoding="utf-8")
    assert re.search(r'train\.py (--resume_from_checkpoint latest )?"\$@"', text), \
        f'{script.name} does not end with train.py "$@"'
    assert "exec python -m afqmc_dist.launcher " in text  # the tool's ending and signals, not accelerate's
    assert "set -euo pipefail" in text
    assert "--config_file accelerate_config.yaml" in text or script.name == "sharded.sh"


# --- the scripts, run against stand-ins --------------------------------------------------------------------

GPU_COUNT = "import torch; print(torch.cuda.device_count())"  # the scripts' GPU count, run by `python -c`
FAKE_PYTHON = """#!{python}
import json, os, signal, sys, time
def record(**what):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(what) + "\\n")
if sys.argv[1:] == ["-c", {gpu_count!r}]:
    print(os.environ["FAKE_GPUS"])  # what torch would count
    sys.exit(0)
if sys.argv[1:3] != ["-m", "afqmc_dist.launcher"]:
    record(tool="python", unexpected=sys.argv[1:])
    sys.exit(99)
if os.environ.get("FAKE_TRAIN_SECONDS"):  # a run that trains until a stop signal, then saves and exits 3
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, lambda signum, _: (record(event=signal.Signals(signum).name), sys.exit(3)))
record(tool="python", argv=sys.argv[3:], cwd=os.getcwd(),
       env={{k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS")}})
time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))  # the tool's status, as the launcher would exit
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
printf '{"tool": "nvidia-smi"}\\n' >> "$FAKE_LOG"
for i in 0 1 2 3; do echo "GPU $i: Fake GPU (UUID: GPU-$i)"; done
"""
FAKE_SRUN = """#!{python}
# Record srun's own options, then run the task once, as node 1 of the allocation.
import json, os, sys
options, task = [], sys.argv[1:]
while task[0].startswith("--"):
    options.append(task.pop(0))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "srun", "options": options}}) + "\\n")
os.environ["SLURM_NODEID"] = "1"
os.execvp(task[0], task)
"""
FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] && printf 'node-a\\nnode-b\\n'
[ "$1" = "requeue" ] && printf '{"event": "requeue %s"}\\n' "$2" >> "$FAKE_LOG"
exit 0
"""
SLURM_ENV = {"SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
             "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "64"}
SCRIPT_ENV = {"multi_node.sh": MULTI_NODE_ENV, "slurm.sbatch": SLURM_ENV}  # what each script needs to launch


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def run_script(tmp_path):
    """Run a launch script with only stand-ins and basic tools on PATH; return (result, [recorded events]).

    gpus: how many GPUs the stand-in `python` says torch sees (its `nvidia-smi` always lists 4).
    send: a signal sent to the script's process once the stand-in launcher has started ("training").
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "wc", "head", "cat"):  # no real python / accelerate / nvidia-smi reachable
        os.symlink(shutil.which(tool), bin_dir / tool)
    _write_exe(bin_dir / "python", FAKE_PYTHON.format(python=sys.executable, gpu_count=GPU_COUNT))
    _write_exe(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    _write_exe(bin_dir / "srun", FAKE_SRUN.format(python=sys.executable))
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    log = tmp_path / "events.jsonl"

    def run(name: str, args=USER_ARGS, env=None, gpus=4, send=None):
        log.unlink(missing_ok=True)
        full_env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "FAKE_LOG": str(log), "FAKE_GPUS": str(gpus),
                    **(env or {})}
        process = subprocess.Popen([shutil.which("bash"), str(LAUNCH / name), *args], cwd=tmp_path, env=full_env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if send is not None:
            while process.poll() is None and '"argv"' not in (log.read_text() if log.exists() else ""):
                time.sleep(0.02)
            process.send_signal(send)
        out, err = process.communicate(timeout=limit(60))
        events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return subprocess.CompletedProcess(process.args, process.returncode, out, err), events

    return run


def _opt(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _launches(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("tool") == "python"]


def _launched_once(result, events, prefix=(), config="accelerate_config.yaml") -> dict:
    assert result.returncode == 0, result.stderr
    assert len(_launches(events)) == 1, events
    launch = _launches(events)[0]
    argv = launch["argv"]  # what follows `python -m afqmc_dist.launcher`
    assert argv[argv.index("train.py") + 1:] == [*prefix, *USER_ARGS]  # passed intact
    assert launch["cwd"] == str(ROOT)  # works from anywhere: the script cd's to the repo root
    assert _opt(argv, "--config_file") == config
    assert {"tool": "nvidia-smi"} not in events  # the GPU count is torch's
    return launch


@pytest.mark.parametrize("gpu", [None, "1"])
def test_single_gpu(run_script, gpu):
    launch = _launched_once(*run_script("single_gpu.sh", env={"GPU": gpu} if gpu else None))
    assert _opt(launch["argv"], "--gpu_ids") == (gpu or "0")
    assert _opt(launch["argv"], "--num_processes") == "1" and "--multi_gpu" not in launch["argv"]


@pytest.mark.parametrize("name, precision", [("multi_gpu.sh", None), ("bf16.sh", "bf16"), ("fp16.sh", "fp16")])
def test_gpu_scripts_use_every_gpu_torch_sees(run_script, name, precision):
    """torch counts what CUDA_VISIBLE_DEVICES leaves (2 here), where `nvidia-smi -L` lists every GPU (4)."""
    argv = _launched_once(*run_script(name, gpus=2))["argv"]
    assert "--multi_gpu" in argv and _opt(argv, "--num_processes") == "2"
    assert _opt(argv, "--mixed_precision") == precision


def test_multi_gpu_with_one_gpu_runs_a_single_process(run_script):
    argv = _launched_once(*run_script("multi_gpu.sh", env={"NPROC": "1"}))["argv"]
    assert "--multi_gpu" not in argv and _opt(argv, "--num_processes") == "1"  # accelerate refuses multi_gpu x1


def test_bf16_without_a_gpu_runs_one_process_on_the_cpu(run_script):
    launch = _launched_once(*run_script("bf16.sh", gpus=0))
    assert "--cpu" in launch["argv"] and _opt(launch["argv"], "--num_processes") == "1"
    assert launch["env"]["ACCELERATE_USE_CPU"] == "1"


@pytest.mark.parametrize("engine", [None, "fsdp", "deepspeed"])
def test_sharded_script_takes_the_engines_config_and_every_gpu(run_script, engine):
    env = {"ENGINE": engine, "MIXED_PRECISION": "bf16"} if engine else None
    launch = _launched_once(*run_script("sharded.sh", env=env), config=f"launch/{engine or 'fsdp'}.yaml")
    assert _opt(launch["argv"], "--num_processes") == "4"
    assert _opt(launch["argv"], "--mixed_precision") == ("bf16" if engine else "no")


@pytest.mark.parametrize(("name", "env", "gpus", "message"), [
    ("sharded.sh", {"ENGINE": "zero"}, 4, "ENGINE=zero: use fsdp or deepspeed"),
    ("sharded.sh", None, 0, "sharded training needs GPUs"),
    ("multi_gpu.sh", None, 0, "torch sees no GPU"),
    ("fp16.sh", None, 0, "on a CPU use launch/bf16.sh"),
])
def test_gpu_scripts_refuse_without_launching(run_script, name, env, gpus, message):
    result, events = run_script(name, env=env, gpus=gpus)
    assert result.returncode == 2 and _launches(events) == []
    assert message in result.stderr


def test_multi_node_computes_total_processes(run_script):
    argv = _launched_once(*run_script("multi_node.sh", env=MULTI_NODE_ENV))["argv"]
    assert "--multi_gpu" in argv
    assert [_opt(argv, f) for f in ("--num_machines", "--machine_rank", "--num_processes", "--main_process_ip",
                                    "--main_process_port")] == ["2", "1", "16", "10.0.0.1", "29500"]


@pytest.mark.parametrize("missing", sorted(MULTI_NODE_ENV))
def test_multi_node_names_a_missing_variable_before_launching(run_script, missing):
    env = {k: v for k, v in MULTI_NODE_ENV.items() if k != missing}
    result, events = run_script("multi_node.sh", env=env)
    assert result.returncode != 0
    assert _launches(events) == []  # checked BEFORE the launcher was called: nothing started
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and "is not set" in lines[0], result.stderr


def test_multi_node_rejects_non_numeric_counts(run_script):
    result, events = run_script("multi_node.sh", env={**MULTI_NODE_ENV, "GPUS_PER_NODE": "eight"})
    assert result.returncode != 0 and _launches(events) == [] and "GPUS_PER_NODE" in result.stderr


def test_slurm_sbatch(run_script):
    # Always resumable: a requeued job passes the same arguments and continues from its newest checkpoint.
    result, events = run_script("slurm.sbatch", env=SLURM_ENV)
    argv = _launched_once(result, events, prefix=["--resume_from_checkpoint", "latest"])["argv"]
    assert "--multi_gpu" in argv
    # machine_rank comes from the task's own SLURM_NODEID (1 in the stand-in srun), not the batch shell's.
    assert [_opt(argv, f) for f in ("--num_machines", "--machine_rank", "--num_processes", "--main_process_ip",
                                    "--main_process_port")] == ["2", "1", "16", "node-a", "29500"]
    # SLURM >= 22.05 no longer hands the job's --cpus-per-task to srun: the step would get one CPU.
    (srun,) = [e for e in events if e.get("tool") == "srun"]
    assert "--cpus-per-task=64" in srun["options"] and "--kill-on-bad-exit=1" in srun["options"]


def test_slurm_sbatch_on_usr1_stops_the_run_and_requeues(run_script):
    """SLURM's warning signal (`--signal=B:USR1@120`) reaches the batch script: it must pass a stop signal on to
    the run (which saves a checkpoint), wait for it to exit, and requeue the job. The signal is SIGUSR1, which srun
    passes on as it is (on SIGTERM real srun kills its tasks at once: tests/test_slurm.py runs it)."""
    result, events = run_script("slurm.sbatch", env={**SLURM_ENV, "FAKE_TRAIN_SECONDS": "30"}, send=signal.SIGUSR1)

    assert result.returncode == 0, result.stderr
    assert [e["event"] for e in events if "event" in e] == ["SIGUSR1", "requeue 4242"]  # in this order
    assert "requeued job 4242" in result.stderr


@pytest.mark.parametrize("name", EXPECTED)
def test_every_script_exits_with_the_launchers_status(run_script, name):
    """The launcher exits with the tool's status (2: bad input here); no script may turn it into another."""
    result, events = run_script(name, env={**SCRIPT_ENV.get(name, {}), "FAKE_EXIT": "2"})
    assert len(_launches(events)) == 1
    assert result.returncode == 2, result.stderr


@pytest.mark.parametrize("name", EXPECTED)
def test_every_script_passes_sigterm_to_the_run_and_exits_3(run_script, name):
    """What a job script, `timeout` or scancel does: SIGTERM to the script's process reaches the launcher (which
    passes it to the training processes: see the real runs below); the script exits with its 3."""
    result, events = run_script(name, env={**SCRIPT_ENV.get(name, {}), "FAKE_TRAIN_SECONDS": "30"},
                                send=signal.SIGTERM)
    assert result.returncode == 3, result.stderr
    passed_on = "SIGUSR1" if name == "slurm.sbatch" else "SIGTERM"  # through srun: see the test above
    assert [e["event"] for e in events if "event" in e] == [passed_on]  # and no requeue
