"""What every row works on: the same data subsets and the same random-init model folders.

Data: `../shared/data/afqmc` when present (real AFQMC), else the bundled sample set, or `--data_dir`. Each row
trains on the first N pairs of train.json, evaluates the first N of dev.json and predicts the first N of
test.json. A count beyond a file's length repeats the file from its start (the sample set has 240 training pairs:
enough to smoke-test, not to keep a GPU busy long enough to measure it); the counts say how many lines are
repeats. Models: random init, bert-base-chinese's vocabulary when `../shared` has it, else the characters of the
data, built once per shape into the bench cache.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import SAMPLE_DATA, SHARED_DATA

MODEL_SHAPES = {
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072},
}


@dataclass(frozen=True)
class Subsets:
    train: Path
    dev: Path
    predict: Path
    counts: dict

    def splits(self) -> dict[str, Path]:
        return {"train": self.train, "dev": self.dev, "predict": self.predict}


def data_source(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    real = SHARED_DATA / "afqmc"
    return real if (real / "train.json").exists() else SAMPLE_DATA


def head_lines(src: Path, dst: Path, limit: int | None, repeat: bool = True) -> tuple[int, int]:
    """Write the first `limit` non-empty lines of `src` (all when None; with `repeat`, cycling through the file
    again when it has fewer) to `dst`. Returns (lines written, of which repeats)."""
    with open(src, encoding="utf-8-sig") as f:
        lines = [line.rstrip("\n") + "\n" for line in f if line.strip()]
    available = len(lines)
    if limit is not None:
        lines = [lines[i % available] for i in range(limit if repeat else min(limit, available))]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(lines), encoding="utf-8")
    return len(lines), max(0, len(lines) - available)


def write_subsets(source: Path, out_dir: Path, n_train: int | None, n_eval: int | None,
                  n_predict: int | None, repeat: bool = True) -> Subsets:
    """The same first-N subsets for every row: train and dev from train/dev.json, predict from test.json (with
    `repeat`, a count beyond a file repeats it: right for speed, wrong for accuracy)."""
    paths = {"train": out_dir / "train.json", "dev": out_dir / "dev.json", "predict": out_dir / "predict.json"}
    counts = {}
    for split, src, limit in (("train", "train.json", n_train), ("dev", "dev.json", n_eval),
                              ("predict", "test.json", n_predict)):
        counts[split], repeats = head_lines(source / src, paths[split], limit, repeat)
        if repeats:
            counts[f"{split}_repeated"] = repeats
    return Subsets(paths["train"], paths["dev"], paths["predict"], counts)


def vocab_file(explicit: str | None) -> Path | None:
    """The WordPiece vocab of the models, or None for a character vocab of the data ("none", or no vocab found)."""
    if explicit == "none":
        return None
    path = Path(explicit) if explicit else SHARED_DATA / "bert-base-chinese-tokenizer" / "vocab.txt"
    return path if path.exists() else None


def build_model(name: str, vocab: Path | None, source: Path, cache: Path) -> Path:
    """The random-init model folder for `name`, built once into CACHE/models and reused."""
    from afqmc_dist.tiny_model import build_tiny_bert, vocab_from_files

    out = cache / "models" / f"{name}-{'bert-vocab' if vocab else 'char-vocab'}"
    marker = out / ".complete"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    chars = None if vocab else vocab_from_files([str(source / f) for f in ("train.json", "dev.json", "test.json")])
    build_tiny_bert(str(out), vocab=chars, vocab_file=str(vocab) if vocab else None, dropout=0.1, seed=0,
                    **MODEL_SHAPES[name])
    marker.write_text("")
    return out


def common_spec(settings: argparse.Namespace, model_dir: Path, subsets: Subsets, precision: str, seed: int) -> dict:
    """The spec every row's child gets: the same files, hyper-parameters, threads and device."""
    # --quick is a smoke test: torch.compile reuses one compile cache across quick runs to stay fast.
    return {"compile_cache": str(settings.cache / "inductor-quick") if settings.quick else None,
            "model_dir": str(model_dir), "train_file": str(subsets.train), "dev_file": str(subsets.dev),
            "predict_file": str(subsets.predict), "precision": precision, "seed": seed,
            "learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
            "eval_batch_size": settings.eval_batch_size, "max_seq_length": settings.max_seq_length,
            "threads": settings.threads, "device": settings.device}


@contextmanager
def sample_workload(prefix: str, train_samples: int):
    """A temporary work folder and the sample data's subsets in it (`train_samples` training pairs, 61 dev
    pairs): (work folder, data), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        work = Path(folder)
        (work / "data").mkdir()
        yield work, write_subsets(SAMPLE_DATA, work / "data", train_samples, 61, 1)
