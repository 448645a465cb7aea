"""What the tool does with a checked file and a model: predict it into OUTPUT (in pieces, resumable), onto stdout
(streamed in input order), or test it (metrics from counts). Call on every rank."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..distributed import on_main
from ..evaluation import metrics_of_counts
from ..outputs import clue_file_name, is_clue_file
from .engine import PieceRunner
from .pieces import Pieces, job_description


@dataclass
class Done:
    """How a prediction went: pairs, pieces, those done before (kept), seconds of this run."""

    pairs: int
    pieces: int
    kept: int
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / max(self.seconds, 1e-9)

    def line(self) -> str:
        kept = f"; {self.kept} of its {self.pieces} pieces were done before and kept" if self.kept else ""
        return f"{self.pairs} predictions ({self.pairs_per_second:.0f} pairs/s{kept})"


def _bar(runner: PieceRunner, desc: str, initial: int):
    return tqdm(total=runner.index.count, initial=initial, desc=desc, unit="pair", unit_scale=True,
                disable=not runner.accelerator.is_local_main_process)


def predict_to_file(runner: PieceRunner, output: str, model_folders: list[str], restart: bool,
                    task_name: str | None, stop_requests=None, desc: str = "predict") -> tuple[list[str], Done]:
    """Predict every pair into OUTPUT (and the CLUE file beside it, named for `task_name`, when every line has an
    id), through OUTPUT.parts/ (pieces.py): complete pieces of an earlier attempt of the same job (the same input,
    `model_folders` and settings) are kept. Returns the paths written and how it went. A CLUE file of an earlier
    prediction in OUTPUT's folder is removed once the new files are in place (with `task_name`: OUTPUT_DIR's
    predictions). A stop signal (`stop_requests`, preemption.py) ends it at once, its line saying where the pieces
    done are kept."""
    accelerator, index = runner.accelerator, runner.index
    # The pieces are the main process's, and describing the job hashes every model file: there only.
    pieces = Pieces(output, job_description(runner, model_folders) if accelerator.is_main_process else {})

    def open_pieces() -> list[int]:
        pieces.open(restart)
        return pieces.complete(index.pieces)

    kept = set(on_main(accelerator, open_pieces))
    todo = [p for p in range(index.pieces) if p not in kept]
    started = time.perf_counter()
    stopping = stop_requests.keeping(f"every piece done is kept in {pieces.folder}: the same command continues "
                                     "from there") if stop_requests else contextlib.nullcontext()
    try:
        with stopping, _bar(runner, desc, sum(index.piece_range(p)[1] for p in kept)) as bar:
            for results in runner.rounds(todo):
                def write(results=results) -> None:
                    for result in results:
                        pieces.write(result.piece, result.lines, result.clue)
                        bar.update(result.count)

                on_main(accelerator, write)  # a failed write (a full disk) stops every rank, with its line
    except BaseException:  # a stop signal, a full disk: the complete pieces stay for the rerun; no empty folder
        if accelerator.is_main_process:
            pieces.remove_if_empty()
        raise
    clue = os.path.join(os.path.dirname(os.path.abspath(output)), clue_file_name(task_name or "afqmc")) \
        if index.has_ids else None

    def assemble() -> list[str]:
        written = pieces.assemble(index.pieces, clue)
        if task_name:
            folder = os.path.dirname(os.path.abspath(output))
            for name in os.listdir(folder):
                if is_clue_file(name) and os.path.join(folder, name) != clue:
                    os.remove(os.path.join(folder, name))
        return written

    written = on_main(accelerator, assemble)
    return written, Done(index.count, index.pieces, len(kept), time.perf_counter() - started)


def predict_to_stdout(runner: PieceRunner) -> Done:
    """Every pair's line on stdout, in input order, as soon as its piece is done (no pieces kept: a pipe cannot be
    resumed). A reader that stops early (`| head`) ends the output quietly."""
    started = time.perf_counter()
    with _bar(runner, "predict", 0) as bar:
        for results in runner.rounds(list(range(runner.index.pieces))):
            if runner.accelerator.is_main_process:
                for result in results:
                    _write_stdout(result.lines)
                    bar.update(result.count)
    return Done(runner.index.count, runner.index.pieces, 0, time.perf_counter() - started)


def _write_stdout(lines: list[str]) -> None:
    try:
        sys.stdout.buffer.write("".join(lines).encode("utf-8"))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader is gone: point stdout at /dev/null so that Python's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def evaluate_file(runner: PieceRunner, positive_id: int, label_list: list[str], desc: str = "test") -> dict:
    """Metrics of the model on a labelled file, from integer counts accumulated piece by piece (the same on every
    rank: every rank gets every round's results)."""
    k = len(label_list)
    matrix, loss_sum = [[0] * k for _ in range(k)], 0.0
    started = time.perf_counter()
    with _bar(runner, desc, 0) as bar:
        for results in runner.rounds(list(range(runner.index.pieces))):
            for result in results:
                for label, pred in zip(result.labels, result.pred_ids, strict=True):
                    matrix[label][pred] += 1
                loss_sum += result.loss_sum
                bar.update(result.count)
    metrics = metrics_of_counts(matrix, positive_id, label_list)
    seconds = time.perf_counter() - started
    return {**metrics, "loss": loss_sum / max(metrics["count"], 1), "samples_per_second": metrics["count"] / seconds}
