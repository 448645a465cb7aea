"""Sentence-pair data for training and evaluation: map-style and streaming datasets, collation, DataLoaders.

Files are read and checked by `pairs.py` (the first bad line raises UserError("FILE:LINE: what is wrong")) and
tokenised once by `encoding.py` (with its self-checking cache); this module turns them into batches. Its names are
the data layer's public interface, so the reading and tokenising names are importable from here too.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .encoding import Encodings, cached_encode_pairs, default_cache_dir, encode_pairs
from .errors import UserError
from .pairs import PairExample, PairSchema, iter_pairs, read_pairs
from .sampling import GlobalBatchSampler, epoch_seed

__all__ = [
    "Encodings", "PairCollator", "PairDataset", "PairExample", "PairSchema", "StreamingPairDataset",
    "cached_encode_pairs", "default_cache_dir", "encode_datasets", "encode_pairs", "iter_pairs", "load_datasets",
    "make_eval_dataloader", "make_train_dataloader", "read_pairs",
]


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

    @property
    def label_counts(self) -> Counter:
        """Pairs per class id."""
        return Counter(e.label for e in self.examples)

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

    DataLoader workers: a DataLoader with W workers asks worker 0 for its batch 0, worker 1 for batch 1, ...,
    round-robin. So worker k keeps (and tokenises) only the items of batches k, k + W, k + 2W, ... of the stream,
    `batch_size` items each, and the loader yields exactly the batches, in the order, that 0 workers would.
    `batch_size` must therefore be the DataLoader's batch size (`make_train_dataloader` sets it). Use it with
    non-persistent workers: each epoch's iterator must carry the epoch that `set_epoch` set.
    """

    def __init__(self, path: str, schema: PairSchema, seed: int, buffer_size: int, limit: int | None = None):
        self.path, self.schema, self.seed, self.buffer_size, self.limit = path, schema, seed, buffer_size, limit
        self.epoch, self.pad_to, self.batch_size = 0, 1, 1
        self.tokenizer, self.max_length = None, None
        labels = (e.label for e in iter_pairs(path, schema, require_label=True))  # every line checked
        self.label_counts = Counter(label for i, label in enumerate(labels) if limit is None or i < limit)
        self.num_examples = sum(self.label_counts.values())
        if self.num_examples == 0:
            raise UserError(f"{path}: no examples in file")

    def encode(self, tokenizer, max_length: int, cache_dir: str | None = None) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length  # a stream is tokenised on the fly: no cache

    def __len__(self) -> int:
        return self.num_examples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _item(self, i: int, example: PairExample, weight: float) -> dict:
        encodings = encode_pairs(self.tokenizer, [example], self.max_length)
        input_ids, token_type_ids = encodings[0]
        return {"index": i, "input_ids": input_ids, "token_type_ids": token_type_ids, "label": example.label,
                "weight": weight}

    def _shuffled(self) -> Iterator[tuple[int, PairExample]]:
        """(line index, example) of this epoch's order: the file through the seeded shuffle buffer."""
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
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _padded(self) -> Iterator[tuple[int, PairExample, float]]:
        """The epoch's stream with its weight: every pair (1.0), then copies of the first ones (0.0) up to a
        multiple of `pad_to`."""
        missing = -self.num_examples % self.pad_to
        first = []
        for i, example in self._shuffled():
            if len(first) < missing:
                first.append((i, example))
            yield i, example, 1.0
        for i, example in itertools.islice(itertools.cycle(first), missing):
            yield i, example, 0.0

    def __iter__(self):
        worker = get_worker_info()
        workers, me = (worker.num_workers, worker.id) if worker else (1, 0)
        for position, item in enumerate(self._padded()):
            if (position // self.batch_size) % workers == me:
                yield self._item(*item)


class PairCollator:
    """Pad encoded dataset items into one batch.

    Output: input_ids, attention_mask `[B, T]`, with T the longest pair of the batch (rounded up to
    `pad_to_multiple_of`, but never beyond `max_length`, the run's max length, which fits the model's positions);
    token_type_ids `[B, T]` for a model that takes them (`token_types`: architectures.takes_token_types); `index`
    `[B]` (position in the dataset, to put gathered predictions back in order); `weight` `[B]` float (1, or 0 for
    padding copies that must not count); `labels` `[B]` when every item has one.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, max_length: int | None = None,
                 token_types: bool = True):
        self.pad_token_id, self.pad_to_multiple_of, self.max_length = pad_token_id, pad_to_multiple_of, max_length
        self.token_types = token_types

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            rounded = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
            width = max(width, min(rounded, self.max_length or rounded))
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        token_type_ids = torch.zeros((len(items), width), dtype=torch.long) if self.token_types else None
        for row, (item, length) in enumerate(zip(items, lengths)):
            input_ids[row, :length] = item["input_ids"]
            attention_mask[row, :length] = 1
            if token_type_ids is not None:
                token_type_ids[row, :length] = item["token_type_ids"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "index": torch.tensor([item["index"] for item in items]),
                 "weight": torch.tensor([item.get("weight", 1.0) for item in items])}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if all(item["label"] is not None for item in items):
            batch["labels"] = torch.tensor([item["label"] for item in items])
        return batch


def load_datasets(cfg, schema: PairSchema) -> dict[str, Dataset]:
    """Read and validate the training and dev files, before any model is loaded or any step is taken: "train" and
    "dev" with --do_train. (The test and predict files, of any size, are checked by a streaming pass instead:
    inference/scan.py; run.py checks them here too, before anything is written.)"""
    datasets: dict[str, Dataset] = {}
    if cfg.do_train:
        if cfg.streaming:
            datasets["train"] = StreamingPairDataset(cfg.train_file, schema, cfg.seed, cfg.shuffle_buffer_size,
                                                     cfg.max_train_samples)
        else:
            datasets["train"] = PairDataset(read_pairs(cfg.train_file, schema, True, cfg.max_train_samples))
        datasets["dev"] = PairDataset(read_pairs(cfg.dev_file, schema, True, cfg.max_eval_samples))
    return datasets


def encode_datasets(datasets: dict[str, Dataset], tokenizer, cfg, accelerator) -> None:
    """Tokenise each dataset once. The local main process goes first and fills the cache; the others read it."""
    cache_dir = None if (cfg.cache_dir or "").lower() == "none" else cfg.cache_dir or default_cache_dir()
    with accelerator.local_main_process_first():
        for dataset in datasets.values():
            dataset.encode(tokenizer, cfg.max_seq_length, cache_dir)


def pad_multiple(cfg, accelerator) -> int | None:
    """What batch lengths are rounded up to: --pad_to_multiple_of, or 8 on a GPU with mixed precision (what tensor
    cores want), or nothing."""
    on_gpu = accelerator.device.type == "cuda"
    return cfg.pad_to_multiple_of or (8 if on_gpu and accelerator.mixed_precision != "no" else None)


def _loader_options(cfg, tokenizer, accelerator, streaming: bool = False, token_types: bool = True) -> dict:
    """DataLoader arguments shared by training and evaluation. On a GPU, batches go through pinned memory and,
    with mixed precision, lengths are rounded up to a multiple of 8 (what tensor cores want), up to
    --max_seq_length at most.

    Workers of a map-style dataset persist across epochs (its sampler runs in the main process, so the workers
    need nothing new each epoch, and starting them once saves a start-up per epoch and evaluation). A streaming
    dataset's workers must not persist: they hold the copy of the dataset made when the epoch's iterator was
    created, and `set_epoch` on the main process's copy would not reach them.
    """
    on_gpu = accelerator.device.type == "cuda"
    workers = cfg.dataloader_num_workers
    collate = PairCollator(tokenizer.pad_token_id, pad_multiple(cfg, accelerator), cfg.max_seq_length, token_types)
    return {"collate_fn": collate, "pin_memory": on_gpu,
            "num_workers": workers, "persistent_workers": workers > 0 and not streaming}


def make_train_dataloader(dataset: Dataset, cfg, plan, tokenizer, accelerator, token_types: bool = True) -> DataLoader:
    """The training DataLoader (before `accelerator.prepare`, which must split its batches: split_batches=True).

    Each batch is one micro-batch of `plan.micro_batch` pairs from the stream of global batches (sampling.py):
    length-grouped (default) or plainly shuffled, or the file's shuffled stream with --streaming. Every order is
    a function of (seed, epoch) and of the global batch size, not of the number of processes.

    The loader gets its own seeded generator so that creating its iterator does not draw from the global torch
    RNG (which also drives dropout): the data order and the dropout stream stay independent and repeatable.
    """
    streaming = isinstance(dataset, IterableDataset)
    options = _loader_options(cfg, tokenizer, accelerator, streaming, token_types)
    # One process can take a short last micro-batch; several must each get a share of every micro-batch.
    pad_to = plan.micro_batch if plan.num_processes > 1 else 1
    if streaming:
        dataset.pad_to, dataset.batch_size = pad_to, plan.micro_batch  # batch_size: how workers share the stream
        return DataLoader(dataset, batch_size=plan.micro_batch, **options)
    sampler = GlobalBatchSampler(len(dataset), plan.global_batch, cfg.seed,
                                 lengths=dataset.lengths if cfg.group_by_length else None,
                                 group_size=cfg.length_group_size, drop_last=cfg.dataloader_drop_last, pad_to=pad_to)
    return DataLoader(dataset, batch_size=plan.micro_batch, sampler=sampler,
                      generator=torch.Generator().manual_seed(cfg.seed), **options)


def make_eval_dataloader(dataset: PairDataset, cfg, plan, tokenizer, accelerator,
                         token_types: bool = True) -> DataLoader:
    """A DataLoader over `dataset` (dev, test or predict input), longest pairs first, before `accelerate.prepare`.

    Sorting by length makes large eval batches cheap (almost no padding); `predict` puts the results back in
    file order through each item's `index`. A batch holds `plan.eval_per_device` pairs per process.
    """
    lengths = dataset.lengths
    by_length = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    # Its own generator: iterating it must not draw from the global RNG that drives dropout in training.
    return DataLoader(dataset, batch_size=plan.eval_per_device * plan.num_processes, sampler=by_length,
                      generator=torch.Generator().manual_seed(cfg.seed),
                      **_loader_options(cfg, tokenizer, accelerator, token_types=token_types))
