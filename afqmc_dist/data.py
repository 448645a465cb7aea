"""Sentence-pair data: validated JSON-lines reading, map-style and streaming datasets, and batch collation.

A file holds one JSON object per line, e.g. AFQMC's
    {"sentence1": "花呗如何还款", "sentence2": "花呗怎么还钱", "label": "1"}
Test files carry "id" and no "label". Keys and label values are configurable (`PairSchema`), so LCQMC, BQ and
other datasets of this shape work unchanged. Every line is checked while it is read; the first bad one raises
UserError("FILE:LINE: what is wrong").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .errors import UserError
from .sampling import GlobalBatchSampler, epoch_seed


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


@dataclass
class Encodings:
    """Token ids of N tokenised pairs, stored flat: pair i is `input_ids[offsets[i]:offsets[i + 1]]`.

    Each pair is `[CLS] s1 [SEP] s2 [SEP]` (token_type_ids 0 then 1), truncated to the run's max length.
    """

    input_ids: torch.Tensor  # [total tokens] int32
    token_type_ids: torch.Tensor  # [total tokens] int8
    offsets: torch.Tensor  # [N + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.token_type_ids[start:end]

    @property
    def lengths(self) -> list[int]:
        return self.offsets.diff().tolist()


def encode_pairs(tokenizer, examples: list[PairExample], max_length: int, chunk: int = 1000) -> Encodings:
    """Tokenise every pair once (in chunks, with the fast tokenizer's batch call)."""
    ids, types, lengths = [], [], [0]
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        encoded = tokenizer([e.sentence1 for e in part], [e.sentence2 for e in part], truncation=True,
                            max_length=max_length, return_token_type_ids=True, return_attention_mask=False)
        for pair_ids, pair_types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True):
            ids += pair_ids
            types += pair_types
            lengths.append(len(pair_ids))
    return Encodings(torch.tensor(ids, dtype=torch.int32), torch.tensor(types, dtype=torch.int8),
                     torch.tensor(lengths).cumsum(0))


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "afqmc_dist")


def _cache_key(tokenizer, examples: list[PairExample], max_length: int) -> str:
    """A digest of the pairs' text, the tokenizer (vocabulary and rules) and the max length."""
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\x1f{max_length}\x1f".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None
                  else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for e in examples:
        digest.update(f"{e.sentence1}\x1f{e.sentence2}\x1e".encode())
    return digest.hexdigest()[:32]


def cached_encode_pairs(tokenizer, examples: list[PairExample], max_length: int, cache_dir: str | None) -> Encodings:
    """`encode_pairs`, read from / written to `cache_dir` (keyed by text + tokenizer + max length) when given.

    A later run on the same file, tokenizer and max length loads the ids instead of tokenising again. The file
    is written through a temporary name, so concurrent writers (one per node) cannot leave a torn file.
    """
    if not cache_dir:
        return encode_pairs(tokenizer, examples, max_length)
    path = os.path.join(cache_dir, f"pairs-{_cache_key(tokenizer, examples, max_length)}.pt")
    if os.path.isfile(path):
        return Encodings(**torch.load(path, weights_only=True))
    encodings = encode_pairs(tokenizer, examples, max_length)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(dataclasses.asdict(encodings), tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the next run a re-tokenisation
    return encodings


class PairDataset(Dataset):
    """Map-style dataset over examples held in memory, tokenised once by `encode`.

    Item i is `{"index": i, "input_ids": [T_i], "token_type_ids": [T_i], "label": class id or None, "weight": 1.0}`.
    Item N + i (N = len) is a copy of item i with weight 0.0: padding that tops up the last global batch so that
    every process has a share of it, without counting any pair twice (see sampling.py).
    """

    def __init__(self, examples: list[PairExample]):
        self.examples = examples
        self.encodings: Encodings | None = None

    def encode(self, tokenizer, max_length: int, cache_dir: str | None = None) -> None:
        self.encodings = cached_encode_pairs(tokenizer, self.examples, max_length, cache_dir)

    @property
    def lengths(self) -> list[int]:
        """Token count of every pair (after `encode`)."""
        return self.encodings.lengths

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        n = len(self.examples)
        weight = 1.0 if i < n else 0.0
        i = i if i < n else i - n
        input_ids, token_type_ids = self.encodings[i]
        return {"index": i, "input_ids": input_ids, "token_type_ids": token_type_ids,
                "label": self.examples[i].label, "weight": weight}


class StreamingPairDataset(IterableDataset):
    """Training pairs read lazily from disk, for files that do not fit in memory.

    The file is validated and counted once at construction (one pass, constant memory), so a bad line stops the
    run before training and the scheduler knows the number of steps. Each epoch streams the file through a
    shuffle buffer seeded by (seed, epoch): every process produces the same stream, and accelerate's
    `IterableDatasetShard` (set up by `accelerator.prepare`) keeps each process's share of every global batch.
    Items are those of `PairDataset`, tokenised as they stream by (after `encode` has set the tokenizer). With
    `pad_to` > 1, the stream ends with weight-0 copies of its first items, up to a multiple of `pad_to` (the
    micro-batch, on several processes: see sampling.py).
    """

    def __init__(self, path: str, schema: PairSchema, seed: int, buffer_size: int, limit: int | None = None):
        self.path, self.schema, self.seed, self.buffer_size, self.limit = path, schema, seed, buffer_size, limit
        self.epoch, self.pad_to = 0, 1
        self.tokenizer, self.max_length = None, None
        count = sum(1 for _ in iter_pairs(path, schema, require_label=True))
        if count == 0:
            raise UserError(f"{path}: no examples in file")
        self.num_examples = min(count, limit) if limit else count

    def encode(self, tokenizer, max_length: int, cache_dir: str | None = None) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length  # a stream is tokenised on the fly: no cache

    def __len__(self) -> int:
        return self.num_examples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _item(self, i: int, example: PairExample) -> dict:
        encodings = encode_pairs(self.tokenizer, [example], self.max_length)
        input_ids, token_type_ids = encodings[0]
        return {"index": i, "input_ids": input_ids, "token_type_ids": token_type_ids, "label": example.label,
                "weight": 1.0}

    def _shuffled(self) -> Iterator[dict]:
        rng = random.Random(epoch_seed(self.seed, self.epoch))
        buffer: list[tuple[int, PairExample]] = []
        for i, example in enumerate(iter_pairs(self.path, self.schema, require_label=True)):
            if i >= self.num_examples:
                break
            item = (i, example)
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield self._item(*item)
        rng.shuffle(buffer)
        yield from (self._item(*item) for item in buffer)

    def __iter__(self):
        missing = -self.num_examples % self.pad_to
        first = []
        for item in self._shuffled():
            if len(first) < missing:
                first.append(item)
            yield item
        for item in itertools.islice(itertools.cycle(first), missing):
            yield {**item, "weight": 0.0}


class PairCollator:
    """Pad encoded dataset items into one batch.

    Output: input_ids, token_type_ids, attention_mask `[B, T]`, with T the longest pair of the batch (rounded up
    to `pad_to_multiple_of`); `index` `[B]` (position in the dataset, to put gathered predictions back in
    order); `weight` `[B]` float (1, or 0 for padding copies that must not count); `labels` `[B]` when every item
    has one.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(items), width), dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (item, length) in enumerate(zip(items, lengths)):
            input_ids[row, :length] = item["input_ids"]
            token_type_ids[row, :length] = item["token_type_ids"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                 "index": torch.tensor([item["index"] for item in items]),
                 "weight": torch.tensor([item.get("weight", 1.0) for item in items])}
        if all(item["label"] is not None for item in items):
            batch["labels"] = torch.tensor([item["label"] for item in items])
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


def encode_datasets(datasets: dict[str, Dataset], tokenizer, cfg, accelerator) -> None:
    """Tokenise each dataset once. The local main process goes first and fills the cache; the others read it."""
    cache_dir = None if (cfg.cache_dir or "").lower() == "none" else cfg.cache_dir or default_cache_dir()
    with accelerator.local_main_process_first():
        for dataset in datasets.values():
            dataset.encode(tokenizer, cfg.max_seq_length, cache_dir)


def _loader_options(cfg, tokenizer, accelerator) -> dict:
    """DataLoader arguments shared by training and evaluation. On a GPU, batches go through pinned memory and,
    with mixed precision, lengths are rounded up to a multiple of 8 (what tensor cores want)."""
    on_gpu = accelerator.device.type == "cuda"
    multiple = cfg.pad_to_multiple_of or (8 if on_gpu and accelerator.mixed_precision != "no" else None)
    return {"collate_fn": PairCollator(tokenizer.pad_token_id, multiple), "pin_memory": on_gpu,
            "num_workers": cfg.dataloader_num_workers}


def make_train_dataloader(dataset: Dataset, cfg, plan, tokenizer, accelerator) -> DataLoader:
    """The training DataLoader (before `accelerator.prepare`, which must split its batches: split_batches=True).

    Each batch is one micro-batch of `plan.micro_batch` pairs from the stream of global batches (sampling.py):
    length-grouped (default) or plainly shuffled, or the file's shuffled stream with --streaming. Every order is
    a function of (seed, epoch) and of the global batch size, not of the number of processes.

    The loader gets its own seeded generator so that creating its iterator does not draw from the global torch
    RNG (which also drives dropout): the data order and the dropout stream stay independent and repeatable.
    """
    options = _loader_options(cfg, tokenizer, accelerator)
    # One process can take a short last micro-batch; several must each get a share of every micro-batch.
    pad_to = plan.micro_batch if plan.num_processes > 1 else 1
    if isinstance(dataset, IterableDataset):
        dataset.pad_to = pad_to
        return DataLoader(dataset, batch_size=plan.micro_batch, **options)
    sampler = GlobalBatchSampler(len(dataset), plan.global_batch, cfg.seed,
                                 lengths=dataset.lengths if cfg.group_by_length else None,
                                 group_size=cfg.length_group_size, drop_last=cfg.dataloader_drop_last, pad_to=pad_to)
    return DataLoader(dataset, batch_size=plan.micro_batch, sampler=sampler,
                      generator=torch.Generator().manual_seed(cfg.seed), **options)


def make_eval_dataloader(dataset: PairDataset, cfg, plan, tokenizer, accelerator) -> DataLoader:
    """A DataLoader over `dataset` (dev, test or predict input), longest pairs first, before `accelerate.prepare`.

    Sorting by length makes large eval batches cheap (almost no padding); `predict` puts the results back in
    file order through each item's `index`. A batch holds `plan.eval_per_device` pairs per process.
    """
    lengths = dataset.lengths
    by_length = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    # Its own generator: iterating it must not draw from the global RNG that drives dropout in training.
    return DataLoader(dataset, batch_size=plan.eval_per_device * plan.num_processes, sampler=by_length,
                      generator=torch.Generator().manual_seed(cfg.seed), **_loader_options(cfg, tokenizer, accelerator))
