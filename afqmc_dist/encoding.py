"""Tokenising pairs once, and the on-disk cache that lets a later run on the same file skip it.

The cache is an optimisation, never a source of truth: a cache file is checked against the pairs it claims to
hold before it is used, and one that cannot be read or does not match is rebuilt (with one line saying so). A
cache that cannot be written (read-only or full disk) costs the next run a re-tokenisation, nothing else: the
run goes on, and no temporary file is left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import torch

from .files import free_mib
from .pairs import PairExample


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
    """A digest of the pairs' text, the tokenizer (vocabulary and rules) and the max length.

    The fast tokenizer's serialisation also holds the truncation and padding of its last call: those are left
    out, or the same file would get another key once the tokenizer has encoded anything (a second file, say).
    """
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\x1f{max_length}\x1f".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        rules = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        digest.update(json.dumps(rules, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for e in examples:
        digest.update(f"{e.sentence1}\x1f{e.sentence2}\x1e".encode())
    return digest.hexdigest()[:32]


FIELDS = {"input_ids": torch.int32, "token_type_ids": torch.int8, "offsets": torch.int64}


def cache_problem(content, num_pairs: int, max_length: int, vocab_size: int) -> str | None:
    """Why `content` (a loaded cache file) cannot be the encodings of `num_pairs` pairs, or None if it can.

    Checks the layout and every invariant `encode_pairs` guarantees: one offset per pair plus one, starting at 0,
    increasing by 3 to `max_length` tokens per pair (a pair has at least [CLS] and two [SEP]), ending at the
    number of ids; ids inside the vocabulary, token types 0 or 1. One pass over the tensors, no tokenizer call.
    """
    if not isinstance(content, dict) or set(content) != set(FIELDS) \
            or not all(isinstance(content[k], torch.Tensor) and content[k].dim() == 1 for k in FIELDS):
        return "it does not hold token ids"
    if any(content[name].dtype != dtype for name, dtype in FIELDS.items()):
        return "its tensors have other types than this version writes"
    ids, types, offsets = (content[name] for name in FIELDS)
    if len(offsets) != num_pairs + 1:
        return f"it holds {len(offsets) - 1} pairs, the file has {num_pairs}"
    lengths = offsets.diff()
    if offsets[0] != 0 or offsets[-1] != len(ids) or len(types) != len(ids) \
            or (num_pairs and not (3 <= lengths.min() and lengths.max() <= max_length)):
        return "its offsets do not match its token ids"
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size or types.min() < 0 or types.max() > 1):
        return "it holds ids outside the vocabulary"
    return None


def _load_cache(path: str, examples: list[PairExample], max_length: int, vocab_size: int) -> Encodings | None:
    """The encodings in `path` if it is there and matches `examples`; else None (saying why, when it exists)."""
    if not os.path.isfile(path):
        return None
    try:
        content = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable cache file (torn, junk, another format) is rebuilt
        problem = f"it cannot be read ({type(e).__name__})"
    else:
        problem = cache_problem(content, len(examples), max_length, vocab_size)
    if problem is None:
        return Encodings(**content)
    print(f"tokenisation cache {path} is not usable ({problem}): rebuilding it", file=sys.stderr, flush=True)
    return None


def _save_cache(encodings: Encodings, path: str) -> None:
    """Write `encodings` to `path` through a temporary file of this process, removed if anything fails."""
    folder = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save(dataclasses.asdict(encodings), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError):  # torch.save reports a full disk as a RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        print(f"cannot write the tokenisation cache in {folder} ({free_mib(folder):.0f} MiB free): going on without it",
              file=sys.stderr, flush=True)


def cached_encode_pairs(tokenizer, examples: list[PairExample], max_length: int, cache_dir: str | None) -> Encodings:
    """`encode_pairs`, read from / written to `cache_dir` (keyed by text + tokenizer + max length) when given.

    A later run on the same file, tokenizer and max length loads the ids instead of tokenising again, once they
    pass `cache_problem`. The file is written through a temporary name, so concurrent writers (one per node)
    cannot leave a torn file.
    """
    if not cache_dir:
        return encode_pairs(tokenizer, examples, max_length)
    path = os.path.join(cache_dir, f"pairs-{_cache_key(tokenizer, examples, max_length)}.pt")
    encodings = _load_cache(path, examples, max_length, len(tokenizer))
    if encodings is None:
        encodings = encode_pairs(tokenizer, examples, max_length)
        _save_cache(encodings, path)
    return encodings
