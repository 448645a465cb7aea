"""A prediction stopped in any way continues where it stopped, on any number of processes, and ends byte for byte
as one uninterrupted process would have written it (inference/pieces.py). Real processes: `python -m
afqmc_dist.predict`, or a real launch of 2 or 3 processes (`python -m afqmc_dist.launcher`, accelerate's launch
with the tool's ending; gloo, CPU), stopped with real signals.

The reference is one uninterrupted process over the same file with the same flags. Each process runs one thread
(OMP_NUM_THREADS=1, as `accelerate launch` sets), so that the reference and the resumed runs do the same
arithmetic.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, fill_disk, free_port, kill_tree, limit, synthetic_pairs, write_jsonl

PAIRS, PIECE, BATCH = 2400, 80, 4  # 30 pieces; small batches, so that a 2-process run takes seconds to kill
PIECES = PAIRS // PIECE
CLUE = "afqmc_predict.json"


def command(model: Path, source: Path, output: Path, processes: int, *extra) -> list[str]:
    module = ["-m", "afqmc_dist.predict", "--model", str(model), "--input", str(source), "--output", str(output),
              "--piece_size", str(PIECE), "--batch_size", str(BATCH), *map(str, extra)]
    if processes == 1:
        return [sys.executable, *module]
    return [sys.executable, "-m", "afqmc_dist.launcher", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *module]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=limit(timeout))
    return process.returncode, out, err


def done_pieces(output: Path) -> int:
    parts = Path(f"{output}.parts")
    return sum(name.endswith(".done") for name in os.listdir(parts)) if parts.is_dir() else 0


def stop_after(process: subprocess.Popen, output: Path, pieces: int, sig: int, whole_tree: bool = True) -> int:
    """Send `sig` once `pieces` pieces are complete; return how many were complete once every process ended."""
    deadline = time.monotonic() + limit(240)
    while done_pieces(output) < pieces:
        assert process.poll() is None, f"ended before {pieces} pieces: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    if whole_tree:
        kill_tree(process.pid, sig)
    else:
        process.send_signal(sig)
    finish(process)
    return done_pieces(output)


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    rows = [{"id": f"q{i}", "sentence1": r["sentence1"], "sentence2": r["sentence2"]}
            for i, r in enumerate(synthetic_pairs(PAIRS, seed=11))]
    return write_jsonl(tmp_path_factory.mktemp("big") / "pairs.json", rows)


@pytest.fixture(scope="module")
def reference(trained_run, big_input, tmp_path_factory) -> dict[str, bytes]:
    """OUTPUT and the CLUE file of one uninterrupted process."""
    out, _ = trained_run
    output = tmp_path_factory.mktemp("reference") / "preds.jsonl"
    status, stdout, stderr = finish(start(command(out / "best", big_input, output, 1)))
    assert status == 0, stderr[-3000:]
    assert stdout.startswith(f"{PAIRS} predictions (") and "kept" not in stdout
    return {"preds.jsonl": output.read_bytes(), CLUE: (output.parent / CLUE).read_bytes()}


def assert_same_as(reference: dict[str, bytes], output: Path) -> None:
    assert sorted(os.listdir(output.parent)) == [CLUE, "preds.jsonl"], "OUTPUT.parts/ removed once OUTPUT is whole"
    assert output.read_bytes() == reference["preds.jsonl"]
    assert (output.parent / CLUE).read_bytes() == reference[CLUE]


@pytest.mark.parametrize("kill_at, rerun_processes", [(3, 1), (14, 3)],
                         ids=["early, rerun on 1", "halfway, rerun on 3"])
def test_a_killed_two_process_prediction_continues_on_another_count_without_recomputing(
        trained_run, big_input, reference, tmp_path, kill_at, rerun_processes):
    out, _ = trained_run
    output = tmp_path / "preds.jsonl"

    kept = stop_after(start(command(out / "best", big_input, output, 2)), output, kill_at, signal.SIGKILL)
    assert kill_at <= kept < PIECES and not output.exists()
    status, stdout, stderr = finish(start(command(out / "best", big_input, output, rerun_processes)))

    assert status == 0, stderr[-3000:]
    assert stdout.count(f"{PAIRS} predictions (") == 1
    assert f"; {kept} of its {PIECES} pieces were done before and kept)" in stdout, stdout
    assert_same_as(reference, output)


def test_a_damaged_piece_is_computed_again_and_the_others_kept(trained_run, big_input, reference, tmp_path):
    out, _ = trained_run
    output = tmp_path / "preds.jsonl"
    kept = stop_after(start(command(out / "best", big_input, output, 2)), output, 6, signal.SIGKILL)
    damaged = sorted(Path(f"{output}.parts").glob("piece-*.jsonl"))[1]
    damaged.write_bytes(damaged.read_bytes()[:-10])  # a disk that lost the end of a file

    status, stdout, stderr = finish(start(command(out / "best", big_input, output, 2)))

    assert status == 0, stderr[-3000:]
    assert f"; {kept - 1} of its {PIECES} pieces were done before and kept)" in stdout, stdout
    assert_same_as(reference, output)


@pytest.mark.parametrize("sig, whole_tree", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM to the launcher", "Ctrl-C to every process"])
def test_a_stopped_prediction_ends_in_one_line_and_continues(trained_run, big_input, reference, tmp_path, sig,
                                                             whole_tree):
    out, _ = trained_run
    output = tmp_path / "preds.jsonl"
    process = start(command(out / "best", big_input, output, 2))
    while done_pieces(output) < 4:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.01)
    kill_tree(process.pid, sig) if whole_tree else process.send_signal(sig)
    status, _, stderr = finish(process, timeout=120)
    kept = done_pieces(output)

    assert status == 3 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (f"stopped: {sig.name} received: stopped at once (every piece done is kept in "
                                       f"{output}.parts: the same command continues from there)"), stderr[-3000:]
    assert 4 <= kept < PIECES and not output.exists()
    status, stdout, stderr = finish(start(command(out / "best", big_input, output, 1)))
    assert status == 0, stderr[-3000:]
    assert f"; {kept} of its {PIECES} pieces were done before and kept)" in stdout, stdout
    assert_same_as(reference, output)


def test_a_full_disk_keeps_the_pieces_done_and_the_rerun_completes(trained_run, big_input, reference, small_disk):
    """A real 100 MiB tmpfs, filled until a third of the pieces fit: one error line, the complete pieces stay; the
    rerun, once there is room, computes the others only."""
    out, _ = trained_run
    output = small_disk / "preds" / "preds.jsonl"
    piece_bytes = len(reference["preds.jsonl"]) // PIECES
    # Each piece takes its lines, its CLUE lines and its record, each file at least one 4 KiB page of the tmpfs.
    ballast = fill_disk(small_disk, leave_bytes=(PIECES // 3) * (piece_bytes + 3 * 4096))

    status, stdout, stderr = finish(start(command(out / "best", big_input, output, 1)))
    kept = done_pieces(output)

    assert status == 2
    last = stderr.splitlines()[-1]
    assert last.startswith("error: writing ") and "No space left on device" in last, stderr[-3000:]
    assert stderr.count("error:") == 1 and "Traceback" not in stderr
    assert 0 < kept < PIECES and not output.exists()
    ballast.unlink()
    status, stdout, stderr = finish(start(command(out / "best", big_input, output, 2)))
    assert status == 0, stderr[-3000:]
    assert f"; {kept} of its {PIECES} pieces were done before and kept)" in stdout, stdout
    assert_same_as(reference, output)


def test_the_pieces_of_other_settings_are_refused_in_one_line_and_left_as_they_are(trained_run, big_input,
                                                                                   tmp_path):
    out, _ = trained_run
    output = tmp_path / "preds.jsonl"
    stop_after(start(command(out / "best", big_input, output, 2)), output, 2, signal.SIGKILL)
    parts = Path(f"{output}.parts")
    before = {p.name: p.read_bytes() for p in parts.iterdir()}

    status, stdout, stderr = finish(start(command(out / "best", big_input, output, 1, "--max_seq_length", "64")))

    assert status == 2 and stdout == ""
    assert stderr == (f"error: {parts} holds the pieces of another prediction (max_seq_length: 128 there, 64 now); "
                      "pass --restart to discard them, or write to another --output\n")
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before


def test_a_bad_line_in_the_middle_of_a_big_file_stops_before_the_model_is_loaded(trained_run, tmp_path):
    """The model folder here is broken (its weights cut short): the error names the bad line, not the model, so
    the check came first."""
    out, _ = trained_run
    model = tmp_path / "model"
    shutil.copytree(out / "best", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    source = write_jsonl(tmp_path / "big.json", synthetic_pairs(20_000, seed=5))
    big = source.read_text(encoding="utf-8").splitlines()
    big[15_000] = big[15_000][:-5]
    source.write_text("\n".join(big) + "\n", encoding="utf-8")

    status, stdout, stderr = finish(start(command(model, source, tmp_path / "out" / "preds.jsonl", 1)))

    assert status == 2 and stdout == ""
    assert stderr.startswith(f"error: {source}:15001: not valid JSON") and stderr.count("\n") == 1, stderr
    assert sorted(os.listdir(tmp_path)) == ["big.json", "model"], "nothing written"
