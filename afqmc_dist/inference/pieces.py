"""Predictions written as they are made, in pieces a rerun does not recompute; OUTPUT assembled from them at the end.

    OUTPUT.parts/                    beside OUTPUT while the prediction is under way (removed once OUTPUT is whole)
        job.json                     what the pieces belong to: the input's and the model's fingerprints, the piece
                                     size, every setting that changes a byte of the output
        piece-000042.jsonl           OUTPUT's lines for input pairs 42 x P + 1 ... (43 x P), in input order
        piece-000042.clue.jsonl      the CLUE file's lines for them, when every input line has an id
        piece-000042.done            {"lines": N, "sha256": ..., "clue_sha256": ...}: written last; a piece without
                                     it, or whose files do not match it, is not complete and is computed again

Every file is written through a temporary name and renamed into place (the main process writes them all). The same
command run again after a kill, a stop signal, a full disk or a lost node finds the complete pieces and computes
only the others, on any number of processes: a piece's content depends on its pairs and the model only, so OUTPUT
is byte for byte what one uninterrupted process writes. Pieces of another input, model or setting are refused,
naming the difference (--restart discards them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from ..errors import UserError
from ..files import atomic_open, remove_quietly, write_json
from ..manifest import file_sha256

JOB = "job.json"
COPY_BLOCK = 1 << 20


def parts_folder(output: str) -> str:
    return f"{output}.parts"


def model_fingerprint(folder: str) -> str:
    """One sha256 over every file of a model folder (names and contents): any change of weights, config or
    tokenizer changes the predictions it may make."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            digest.update(f"{name}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def job_description(runner, model_folders: list[str]) -> dict:
    """What the pieces of `runner`'s prediction belong to: every input of a byte of OUTPUT (the input, the model or
    the models of an ensemble, in order, the piece size, and what changes a probability's last digit: device,
    precision, batch size, max length), and the JSON keys. It reads every model file: main process only."""
    index, accelerator, schema = runner.index, runner.accelerator, runner.schema
    fingerprints = [model_fingerprint(folder) for folder in model_folders]
    model = fingerprints[0] if len(fingerprints) == 1 else hashlib.sha256(" ".join(fingerprints).encode()).hexdigest()
    return {"input": {"sha256": index.sha256, "pairs": index.count}, "model": model,
            "piece_size": index.piece_size, "device": accelerator.device.type,
            "precision": accelerator.mixed_precision, "batch_size": runner.batch_size,
            "max_seq_length": runner.members[0].encoder.max_length,
            "keys": [schema.sentence1_key, schema.sentence2_key, schema.id_key]}


class Pieces:
    """OUTPUT.parts/ of one prediction job (`job`: what it belongs to). Main process only."""

    def __init__(self, output: str, job: dict):
        self.output, self.job = output, job
        self.folder = parts_folder(output)

    def _path(self, piece: int, kind: str) -> str:
        return os.path.join(self.folder, f"piece-{piece:06d}.{kind}")

    def open(self, restart: bool) -> None:
        """Take OUTPUT.parts/ for this job: made if new, its pieces kept if they are this job's. UserError naming
        the first difference if they are another's (unless `restart`: then they are removed)."""
        job_file = os.path.join(self.folder, JOB)
        if os.path.isdir(self.folder) and restart:
            shutil.rmtree(self.folder)
        if os.path.exists(self.folder):
            try:
                with open(job_file, encoding="utf-8") as f:
                    recorded = json.load(f)
            except (OSError, ValueError):
                recorded = None
            difference = self._difference(recorded)
            if difference:
                raise UserError(f"{self.folder} holds the pieces of another prediction ({difference}); pass "
                                "--restart to discard them, or write to another --output")
            return
        os.makedirs(self.folder)
        try:
            write_json(job_file, self.job)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def remove_if_empty(self) -> None:
        """After a failure: OUTPUT.parts/ goes if it holds no complete piece (nothing to keep for a rerun)."""
        if os.path.isdir(self.folder) and not any(n.endswith(".done") for n in os.listdir(self.folder)):
            shutil.rmtree(self.folder, ignore_errors=True)

    def _difference(self, recorded: dict | None) -> str | None:
        if not isinstance(recorded, dict):
            return f"no readable {JOB}"
        for key, value in self.job.items():
            if recorded.get(key) != value:
                shown = {k: (v[:12] + "..." if isinstance(v, str) and len(v) == 64 else v)
                         for k, v in (("there", recorded.get(key)), ("here", value))}
                return f"{key}: {shown['there']} there, {shown['here']} now"
        return None

    def complete(self, pieces: int) -> list[int]:
        """The pieces whose files are whole and match their record; the rest (and leftovers) are cleared."""
        for name in os.listdir(self.folder):
            if name.endswith(".tmp"):
                remove_quietly(os.path.join(self.folder, name))
        return [piece for piece in range(pieces) if self._is_complete(piece)]

    def _is_complete(self, piece: int) -> bool:
        try:
            with open(self._path(piece, "done"), encoding="utf-8") as f:
                record = json.load(f)
            whole = file_sha256(self._path(piece, "jsonl")) == record["sha256"]
            if record.get("clue_sha256"):
                whole = whole and file_sha256(self._path(piece, "clue.jsonl")) == record["clue_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            whole = False
        if not whole:
            for kind in ("done", "jsonl", "clue.jsonl"):
                remove_quietly(self._path(piece, kind))
        return whole

    def write(self, piece: int, lines: list[str], clue_lines: list[str] | None) -> None:
        """Write one piece: its lines, then the record that makes it complete."""
        record = {"lines": len(lines), "sha256": _write_lines(self._path(piece, "jsonl"), lines)}
        if clue_lines is not None:
            record["clue_sha256"] = _write_lines(self._path(piece, "clue.jsonl"), clue_lines)
        write_json(self._path(piece, "done"), record)

    def assemble(self, pieces: int, clue: str | None) -> list[str]:
        """OUTPUT (and the CLUE file at `clue`) from the pieces in order, each renamed into place whole; then the
        pieces are removed. Returns the paths written."""
        written = []
        for target, kind in ((self.output, "jsonl"), (clue, "clue.jsonl")):
            if target is None:
                continue
            with atomic_open(target) as out:  # a failed write (a full disk) is one line; the pieces stay
                for piece in range(pieces):
                    with open(self._path(piece, kind), encoding="utf-8") as f:
                        shutil.copyfileobj(f, out, COPY_BLOCK)
            written.append(target)
        shutil.rmtree(self.folder, ignore_errors=True)
        return written


def _write_lines(path: str, lines: list[str]) -> str:
    digest = hashlib.sha256()
    with atomic_open(path) as f:
        for line in lines:
            f.write(line)
            digest.update(line.encode("utf-8"))
    return digest.hexdigest()
