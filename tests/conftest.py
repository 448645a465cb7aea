"""Shared fixtures: small random BERTs built locally, synthetic and real data files, and a way to run the tool.

No test needs the network: models are built with `afqmc_dist.tiny_model` and loaded through the same
`from_pretrained` path as hub checkpoints. Tests that need `../shared` (real AFQMC, bert-base-chinese vocab) skip
when it is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Every model here is a local folder: never let a typo turn into a hub request (there is no network).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every time limit of the tests is multiplied by this: raise it on a slow or busy machine (the limits are set for
# 2 idle CPU cores with room to spare; two heavy jobs at once slow each other down 5-10x).
TIMEOUT_FACTOR = float(os.environ.get("AFQMC_TEST_TIMEOUT_FACTOR", "1"))


def limit(seconds: float) -> float:
    """A test's time limit of `seconds` on 2 idle cores, scaled by AFQMC_TEST_TIMEOUT_FACTOR."""
    return seconds * TIMEOUT_FACTOR

from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SAMPLE_DIR = ROOT / "afqmc_dist" / "sample_data"

# The synthetic task: sentences of filler characters; label "1" iff both sentences carry the planted token.
FILLER = list("的了是在我有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后")
PLANTED = "花"


def requires(*packages: str):
    """Mark a test that needs optional packages (the trackers, Optuna, matplotlib, a database driver): where one
    is not installed (a cluster's pinned image, say) the test is skipped, naming it. Every other test runs."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    verb = "is" if len(missing) == 1 else "are"
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}, which {verb} not installed")


# `pytest -m "not slow"`, the quick first check, leaves out what trains or launches for real (seconds to minutes a
# test): these modules, and tests that use these fixtures. Every test runs in the full suite.
SLOW_MODULES = {"test_architectures", "test_bench", "test_checkpoints", "test_cli", "test_compile",
                "test_distributed", "test_global_batch", "test_inputs", "test_launch", "test_outputs", "test_predict",
                "test_readme", "test_real_data", "test_report", "test_robustness", "test_run_folder", "test_runlock",
                "test_slurm", "test_sweep", "test_tracking", "test_training", "test_kfold"}
SLOW_FIXTURES = {"trained_run", "cpu_check"}


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here): bench/gpu_check.sh runs it on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """`n` pairs, half positive: "1" iff both sentences contain PLANTED, else it is in one or neither.

    Learnable by a tiny BERT in a short CPU run; chance (and the majority guess) is about 50%.
    """
    rng = random.Random(seed)

    def sentence(planted: bool) -> str:
        chars = rng.choices(FILLER, k=rng.randint(4, 9))
        if planted:
            chars.insert(rng.randrange(len(chars) + 1), PLANTED)
        return "".join(chars)

    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        planted = (True, True) if positive else rng.choice([(True, False), (False, True), (False, False)])
        rows.append({"sentence1": sentence(planted[0]), "sentence2": sentence(planted[1]),
                     "label": "1" if positive else "0"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# Wall-clock measurements differ between identical runs; results.json's throughput totals (padding included)
# cover only the part of the run that one process did, so they differ after a resume.
TIMING = ("samples_per_second", "tokens_per_second", "train_runtime", "train_padding_fraction")


def history(out: Path, prefix: str = "dev") -> list[dict]:
    """The metrics.jsonl records of one kind ("dev", "train", "test", ...) with the prefix taken off the keys:
    `{"step": 32, "epoch": 1, "accuracy": 0.9, ...}`."""
    records = []
    for record in read_jsonl(Path(out) / "metrics.jsonl"):
        values = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith(f"{prefix}/")}
        if values:
            records.append({"step": record["step"], "epoch": record.get("epoch"), **values})
    return records


@pytest.fixture
def small_disk(tmp_path):
    """A real, nearly empty filesystem of 100 MiB (a tmpfs mounted at tmp_path/disk), for full-disk tests; the
    test fills it with `fill_disk`. Skips with the reason where mounting is not allowed (not root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_disk(mount: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem at `mount` with a ballast file until at most about `leave_bytes` are free (0: to the
    last byte); delete the returned file to free the space again."""
    import shutil

    ballast = mount / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            while shutil.disk_usage(mount).free - size >= leave_bytes:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:  # full
                    break
    finally:
        os.close(fd)
    return ballast


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes): equal snapshots mean byte-identical trees."""
    import hashlib

    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Change one byte of a file (in its middle by default), as a bad disk or a stray write would."""
    data = bytearray(Path(path).read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    Path(path).write_bytes(bytes(data))


def last_error_line(stderr: str) -> str:
    """The one line a failed run ends with: no traceback anywhere, and `error:` only on the last line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and [line for line in lines if "error: " in line] == lines[-1:], stderr[-3000:]
    return lines[-1]


def without_timing(records: list[dict]) -> list[dict]:
    """Records minus wall-clock measurements, for comparing runs that must compute the same thing."""
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in records]


@pytest.fixture
def fresh_accelerate_state():
    """For tests that call the tool in-process: `Accelerator` state is a process-wide singleton, forget it after."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    """train (512 pairs), dev (101 pairs: an odd count, uneven across 2 processes) and test (64) files."""
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": write_jsonl(root / "train.json", synthetic_pairs(512, seed=1)),
        "dev": write_jsonl(root / "dev.json", synthetic_pairs(101, seed=2)),
        "test": write_jsonl(root / "test.json", synthetic_pairs(64, seed=3)),
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight BERT (hidden 64, 2 layers) whose vocab covers the synthetic task, as an HF folder."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = SPECIAL_TOKENS + sorted(set(FILLER + [PLANTED]))
    build_tiny_bert(str(path), vocab=vocab, hidden_size=64, num_layers=2, num_heads=2, dropout=0.1)
    return path


def free_port() -> int:
    """A TCP port nothing listens on now, for the rendezvous of a multi-process launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(args: list, script: str | None, env: dict | None) -> tuple[list[str], dict]:
    args = [str(a) for a in args]
    command = ["bash", str(ROOT / "launch" / script), *args] if script else [sys.executable, "train.py", *args]
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "MAIN_PROCESS_PORT": str(free_port()), "PYTHONFAULTHANDLER": "1", **(env or {})}
    return command, full_env


def run_tool(args: list, script: str | None = None, env: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS`, or `launch/SCRIPT ARGS` (a real launch through afqmc_dist.launcher), in a fresh
    process.

    W&B is disabled unless `env` says otherwise; the venv running the tests provides `accelerate` on PATH.
    A run still going after `timeout` seconds fails the test with every process's Python stack (see `stacks_of`).
    """
    process = start_tool(args, script, env)
    try:
        out, err = process.communicate(timeout=limit(timeout))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(process.args[:3])} ... still running after {limit(timeout):.0f} s (raise "
                    f"AFQMC_TEST_TIMEOUT_FACTOR on a busy machine); where each process was:\n"
                    f"{stacks_of(process)}", pytrace=False)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def stacks_of(process: subprocess.Popen) -> str:
    """End a hung run and return the end of its stderr, where faulthandler (PYTHONFAULTHANDLER=1, set for every
    run) has written each process's Python stack on SIGABRT."""
    kill_tree(process.pid, signal.SIGABRT)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        _, err = process.communicate()
    return err[-12000:]


def start_tool(args: list, script: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """`run_tool` without waiting (stop it with `kill_tree` or `Popen.send_signal`)."""
    command, full_env = _command(args, script, env)
    return subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def kill_tree(pid: int, sig: int = 9) -> None:
    """Send `sig` to `pid` and all its descendants at once (torchrun puts its workers in their own sessions,
    so killing the launcher's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in tree:
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass


def plain_hf_predict(model_dir: Path, rows: list[dict]) -> list[int]:
    """Class ids predicted by the saved folder loaded with plain transformers classes, one process, no tool code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return predict_rows(model, AutoTokenizer.from_pretrained(model_dir), rows)


def predict_rows(model, tokenizer, rows: list[dict], batch_size: int = 16) -> list[int]:
    """Class ids `model` predicts for `rows` (dicts with sentence1/sentence2), batched, on one process."""
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = tokenizer([r["sentence1"] for r in chunk], [r["sentence2"] for r in chunk],
                            padding=True, truncation=True, max_length=128, return_tensors="pt")
            preds += model(**enc).logits.argmax(-1).tolist()
    return preds


def train_args(model: Path, data: dict[str, Path], output_dir: Path, *extra) -> list[str]:
    """Flags for a short synthetic-task run that learns (see test_training.py) with all three phases."""
    return ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"],
            "--test_file", data["test"], "--predict_file", data["dev"], "--output_dir", output_dir,
            "--do_train", "--do_test", "--do_predict", "--learning_rate", "1e-3", "--num_train_epochs", "8",
            "--batch_size", "16", "--warmup_proportion", "0.1", "--logging_steps", "8", *extra]


@pytest.fixture(scope="session")
def trained_run(tiny_model, synthetic_data, tmp_path_factory):
    """One single-process train + test + predict (on the dev file) run of the synthetic task: (output_dir, result)."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_tool(train_args(tiny_model, synthetic_data, out, "--seed", "7"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
