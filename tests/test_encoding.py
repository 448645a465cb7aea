"""Specification of tokenisation and its cache: keyed by text, tokenizer and max length; checked before use and
rebuilt when damaged; a cache that cannot be written costs one line, never the run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import fill_disk
from pair_files import VOCAB_CHARS
from transformers import AutoTokenizer

from afqmc_dist.encoding import cached_encode_pairs, encode_pairs
from afqmc_dist.pairs import PairExample
from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert-encoding")
    build_tiny_bert(str(path), vocab=SPECIAL_TOKENS + VOCAB_CHARS, hidden_size=32, num_layers=1, num_heads=2)
    return AutoTokenizer.from_pretrained(str(path))


def test_tokenised_files_are_cached_by_text_tokenizer_and_max_length(tokenizer, tmp_path):
    examples = [PairExample("花呗如何还款", "借呗", 1, {}), PairExample("还款", "还钱", 0, {})]
    first = cached_encode_pairs(tokenizer, examples, 64, str(tmp_path))
    (cache_file,) = tmp_path.iterdir()
    again = cached_encode_pairs(tokenizer, examples, 64, str(tmp_path))

    assert list(tmp_path.iterdir()) == [cache_file]  # read back, not written again
    assert all(torch.equal(getattr(first, f), getattr(again, f)) for f in ("input_ids", "token_type_ids", "offsets"))
    cached_encode_pairs(tokenizer, examples, 8, str(tmp_path))
    cached_encode_pairs(tokenizer, examples[:1], 64, str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 3  # another max length, other text: other entries
    assert cached_encode_pairs(tokenizer, examples, 8, str(tmp_path)).lengths == [8, 7]


def test_the_cache_key_does_not_depend_on_what_the_tokenizer_encoded_before(tmp_path):
    """A fast tokenizer remembers the truncation of its last call: the dev file of a second run (whose train file
    came from the cache, so the tokenizer was never called) must still find the first run's entry."""
    folder = tmp_path / "tok"
    build_tiny_bert(str(folder), vocab=SPECIAL_TOKENS + VOCAB_CHARS, hidden_size=32, num_layers=1, num_heads=2)
    fresh = AutoTokenizer.from_pretrained(str(folder))
    cached_encode_pairs(fresh, CACHE_EXAMPLES, 64, str(tmp_path / "cache"))
    used = AutoTokenizer.from_pretrained(str(folder))
    used("花呗", "借呗", truncation=True, max_length=10)

    cached_encode_pairs(used, CACHE_EXAMPLES, 64, str(tmp_path / "cache"))

    assert len(os.listdir(tmp_path / "cache")) == 1


CACHE_FIELDS = ("input_ids", "token_type_ids", "offsets")
CACHE_EXAMPLES = [PairExample("花呗如何还款", "借呗", 1, {}), PairExample("还款", "还钱", 0, {}),
                  PairExample("为什么不能开通花呗", "花呗", 1, {})]


def same_encodings(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in CACHE_FIELDS)


def overwrite_cache(path: Path, **changes) -> None:
    content = torch.load(path, weights_only=True)
    torch.save({**content, **changes}, path)


DAMAGES = {
    "cut short": lambda path, tok: path.write_bytes(path.read_bytes()[:path.stat().st_size // 2]),
    "overwritten with junk": lambda path, tok: path.write_bytes(b"\x00junk" * 100),
    "the ids of other pairs": lambda path, tok: torch.save(
        dataclasses.asdict(encode_pairs(tok, CACHE_EXAMPLES[:2], 64)), path),
    "offsets past the ids": lambda path, tok: overwrite_cache(
        path, offsets=torch.load(path, weights_only=True)["offsets"] + 1),
    "ids outside the vocabulary": lambda path, tok: overwrite_cache(
        path, input_ids=torch.load(path, weights_only=True)["input_ids"] + 10_000),
    "another layout": lambda path, tok: torch.save({"ids": [1, 2, 3]}, path),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_cache_file_is_rebuilt_with_one_line(tokenizer, tmp_path, capsys, damage):
    fresh = cached_encode_pairs(tokenizer, CACHE_EXAMPLES, 64, str(tmp_path))
    (cache_file,) = tmp_path.iterdir()
    damage(cache_file, tokenizer)
    capsys.readouterr()

    again = cached_encode_pairs(tokenizer, CACHE_EXAMPLES, 64, str(tmp_path))

    err = capsys.readouterr().err
    assert same_encodings(again, fresh)
    assert err.startswith(f"tokenisation cache {cache_file} is not usable (") and err.count("\n") == 1, err
    assert err.endswith("): rebuilding it\n")
    assert list(tmp_path.iterdir()) == [cache_file]
    cached_encode_pairs(tokenizer, CACHE_EXAMPLES, 64, str(tmp_path))
    assert capsys.readouterr().err == "", "rebuilt: the next run uses it without a word"


@pytest.fixture
def full_disk(small_disk):
    """The empty folder `cache` on a full disk."""
    (small_disk / "cache").mkdir()
    fill_disk(small_disk, leave_bytes=0)
    return small_disk / "cache"


def test_a_full_disk_costs_the_cache_only_with_one_line_and_no_temporary_left(tokenizer, full_disk, capsys):
    encodings = cached_encode_pairs(tokenizer, CACHE_EXAMPLES, 64, str(full_disk))

    assert same_encodings(encodings, encode_pairs(tokenizer, CACHE_EXAMPLES, 64))
    assert os.listdir(full_disk) == [], "no pairs-*.pt.PID.tmp left behind"
    assert capsys.readouterr().err == f"cannot write the tokenisation cache in {full_disk} (0 MiB free): going on " \
                                      "without it\n"
