"""Sentence-pair data: validated JSON-lines reading, map-style and streaming datasets, and batch collation.

A file holds one JSON object per line, e.g. AFQMC's
    {"sentence1": "花呗如何还款", "sentence2": "花呗怎么还钱", "label": "1"}
Test files carry "id" and no "label". Keys and label values are configurable (`PairSchema`), so LCQMC, BQ and
other datasets of this shape work unchanged. Every line is checked while it is read; the first bad one raises
UserError("FILE:LINE: what is wrong").
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .errors import UserError


@dataclass(frozen=True)
class PairSchema:
    """Where the sentences, label and id live in a JSON line, and which label values exist (order = class id)."""

    sentence1_key: str = "sentence1"
    sentence2_key: str = "sentence2"
    label_key: str = "label"
    id_key: str = "id"
    label_list: tuple[str, ...] = ("0", "1")

    @classmethod
    def from_config(cls, cfg) -> PairSchema:
        return cls(cfg.sentence1_key, cfg.sentence2_key, cfg.label_key, cfg.id_key, tuple(cfg.label_list))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.label_list)}


@dataclass
class PairExample:
    """One validated line. `label` is a class id, or None when the file has no labels; `raw` is the JSON object."""

    sentence1: str
    sentence2: str
    label: int | None
    raw: dict


def _parse_line(text: str, where: str, schema: PairSchema, require_label: bool) -> PairExample:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    sentences = []
    for key in (schema.sentence1_key, schema.sentence2_key):
        if key not in obj:
            raise UserError(f"{where}: missing key {key!r}")
        value = obj[key]
        if not isinstance(value, str):
            raise UserError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise UserError(f"{where}: {key!r} is empty")
        sentences.append(value)
    label = None
    if require_label:
        if schema.label_key not in obj:
            raise UserError(f"{where}: missing key {schema.label_key!r}")
        value = obj[schema.label_key]
        # Some datasets of this shape write labels as numbers (1) rather than strings ("1").
        text_value = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text_value not in schema.label2id:
            allowed = ", ".join(repr(v) for v in schema.label_list)
            raise UserError(f"{where}: label {value!r} is not one of {allowed} (see --label_list)")
        label = schema.label2id[text_value]
    return PairExample(sentences[0], sentences[1], label, obj)


def iter_pairs(path: str, schema: PairSchema, require_label: bool) -> Iterator[PairExample]:
    """Yield validated examples of `path` in file order, reading one line at a time.

    Tolerates a UTF-8 byte-order mark, CRLF line ends and blank lines at the end of the file; a blank line
    followed by more data is an error (it would shift every later line number).
    """
    blank_at = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not valid UTF-8") from None
            if not text:
                blank_at = blank_at or lineno
                continue
            if blank_at is not None:
                raise UserError(f"{path}:{blank_at}: empty line")
            yield _parse_line(text, f"{path}:{lineno}", schema, require_label)


def read_pairs(path: str, schema: PairSchema, require_label: bool, limit: int | None = None) -> list[PairExample]:
    """All (or the first `limit`) examples of `path`, validated. Raises UserError if the file holds none."""
    examples = []
    for example in iter_pairs(path, schema, require_label):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no examples in file")
    return examples


class PairDataset(Dataset):
    """Map-style dataset over examples held in memory. Item i is `{"index": i, "example": PairExample}`."""

    def __init__(self, examples: list[PairExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "example": self.examples[i]}


class StreamingPairDataset(IterableDataset):
    """Training pairs read lazily from disk, for files that do not fit in memory.

    The file is validated and counted once at construction (one pass, constant memory), so a bad line stops the
    run before training and the scheduler knows the number of steps. Each epoch streams the file through a
    shuffle buffer seeded by (seed, epoch): every process produces the same stream, and accelerate's
    `IterableDatasetShard` (set up by `accelerator.prepare`) keeps each process's share of every global batch.
    """

    def __init__(self, path: str, schema: PairSchema, seed: int, buffer_size: int, limit: int | None = None):
        self.path, self.schema, self.seed, self.buffer_size, self.limit = path, schema, seed, buffer_size, limit
        self.epoch = 0
        count = sum(1 for _ in iter_pairs(path, schema, require_label=True))
        if count == 0:
            raise UserError(f"{path}: no examples in file")
        self.num_examples = min(count, limit) if limit else count

    def __len__(self) -> int:
        return self.num_examples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.seed * 100_003 + self.epoch)
        buffer: list[dict] = []
        for i, example in enumerate(iter_pairs(self.path, self.schema, require_label=True)):
            if i >= self.num_examples:
                break
            item = {"index": i, "example": example}
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer


class PairCollator:
    """Tokenise a list of dataset items into one padded batch.

    Pairs become `[CLS] s1 [SEP] s2 [SEP]` (token_type_ids 0 then 1), truncated to `max_length` tokens and
    padded to the longest pair of the batch. Output: input_ids, token_type_ids, attention_mask `[B, T]`;
    `index` `[B]` (position in the dataset, to put gathered predictions back in order); `labels` `[B]` when
    every example has one.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        examples = [item["example"] for item in items]
        batch = dict(self.tokenizer(
            [e.sentence1 for e in examples], [e.sentence2 for e in examples],
            truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
        ))
        batch["index"] = torch.tensor([item["index"] for item in items])
        if all(e.label is not None for e in examples):
            batch["labels"] = torch.tensor([e.label for e in examples])
        return batch


def load_datasets(cfg, schema: PairSchema) -> dict[str, Dataset]:
    """Read and validate every input file the run needs, before any model is loaded or any step is taken.

    A bad line in the test file then stops the run at once, not after hours of training. Keys: "train" and
    "dev" with --do_train, "test" with --do_test, "predict" with --do_predict.
    """
    datasets: dict[str, Dataset] = {}
    if cfg.do_train:
        if cfg.streaming:
            datasets["train"] = StreamingPairDataset(cfg.train_file, schema, cfg.seed, cfg.shuffle_buffer_size,
                                                     cfg.max_train_samples)
        else:
            datasets["train"] = PairDataset(read_pairs(cfg.train_file, schema, True, cfg.max_train_samples))
        datasets["dev"] = PairDataset(read_pairs(cfg.dev_file, schema, True, cfg.max_eval_samples))
    if cfg.do_test:
        datasets["test"] = PairDataset(read_pairs(cfg.test_file, schema, True))
    if cfg.do_predict:
        datasets["predict"] = PairDataset(read_pairs(cfg.predict_input, schema, False))
    return datasets


def make_train_dataloader(dataset: Dataset, cfg, tokenizer) -> DataLoader:
    """The training DataLoader (before `accelerator.prepare`): shuffled, or in stream order with --streaming.

    The loader gets its own seeded generator so that creating its iterator does not draw from the global torch
    RNG (which also drives dropout): the data order and the dropout stream stay independent and repeatable.
    """
    collate = PairCollator(tokenizer, cfg.max_seq_length)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.seed))


def make_eval_dataloader(dataset: Dataset, cfg, tokenizer) -> DataLoader:
    """A DataLoader over `dataset` in file order (dev, test or predict input), before `accelerator.prepare`."""
    return DataLoader(dataset, batch_size=cfg.per_device_eval_batch_size, shuffle=False,
                      collate_fn=PairCollator(tokenizer, cfg.max_seq_length))
