"""Specification of the data layer: reading and validating JSON-lines pairs, collation, streaming and sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import IterableDatasetShard
from conftest import SHARED, write_jsonl
from transformers import AutoTokenizer, BertTokenizer

from afqmc_dist.data import (
    PairCollator,
    PairDataset,
    PairExample,
    PairSchema,
    StreamingPairDataset,
    cached_encode_pairs,
    read_pairs,
)
from afqmc_dist.errors import UserError
from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert

AFQMC = PairSchema()
ROWS = [
    {"sentence1": "花呗如何还款", "sentence2": "花呗怎么还钱", "label": "1"},
    {"sentence1": "借呗能提前还吗", "sentence2": "花呗可以分期吗", "label": "0"},
    {"sentence1": "我的花呗开通不了", "sentence2": "为什么不能开通花呗", "label": "1"},
]
GOOD = json.dumps(ROWS[0], ensure_ascii=False).encode()


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def write_lines(path: Path, lines: list[bytes], end: bytes = b"\n") -> str:
    return write_bytes(path, b"".join(line + end for line in lines))


def line(**fields) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


def user_error(path: str, schema: PairSchema = AFQMC, require_label: bool = True) -> str:
    """The message of the UserError that reading `path` raises (fails the test if nothing is raised)."""
    with pytest.raises(UserError) as info:
        read_pairs(path, schema, require_label=require_label)
    return str(info.value)


# --- valid files --------------------------------------------------------------------------------------------


def test_valid_file_reads_sentences_labels_and_raw_objects(tmp_path):
    rows = [{**ROWS[0], "extra": 7}, ROWS[1], ROWS[2]]
    examples = read_pairs(str(write_jsonl(tmp_path / "train.json", rows)), AFQMC, require_label=True)

    assert [(e.sentence1, e.sentence2) for e in examples] == [(r["sentence1"], r["sentence2"]) for r in rows]
    assert [e.label for e in examples] == [1, 0, 1]
    assert [e.raw for e in examples] == rows  # the whole JSON object, unknown keys included


def test_label_ids_follow_label_list_order(tmp_path):
    path = str(write_jsonl(tmp_path / "train.json", ROWS))
    reversed_schema = PairSchema(label_list=("1", "0"))

    assert [e.label for e in read_pairs(path, reversed_schema, require_label=True)] == [0, 1, 0]
    assert reversed_schema.label2id == {"1": 0, "0": 1}


def test_limit_keeps_the_first_examples(tmp_path):
    path = str(write_jsonl(tmp_path / "train.json", ROWS))

    assert [e.raw for e in read_pairs(path, AFQMC, require_label=True, limit=2)] == ROWS[:2]


def test_utf8_bom_at_file_start_is_ignored(tmp_path):
    path = write_lines(tmp_path / "bom.json", [line(**row) for row in ROWS])
    Path(path).write_bytes(b"\xef\xbb\xbf" + Path(path).read_bytes())

    examples = read_pairs(path, AFQMC, require_label=True)

    assert [e.raw for e in examples] == ROWS
    assert examples[0].sentence1 == "花呗如何还款"


def test_crlf_line_ends_are_accepted(tmp_path):
    path = write_lines(tmp_path / "crlf.json", [line(**row) for row in ROWS], end=b"\r\n")

    examples = read_pairs(path, AFQMC, require_label=True)

    assert [e.raw for e in examples] == ROWS
    assert not any(e.sentence2.endswith("\r") for e in examples)


def test_crlf_file_reports_the_right_line_number(tmp_path):
    path = write_lines(tmp_path / "crlf.json", [GOOD, GOOD, b"{broken", GOOD], end=b"\r\n")

    assert user_error(path).startswith(f"{path}:3: ")


def test_trailing_blank_lines_are_ignored(tmp_path):
    path = write_lines(tmp_path / "trailing.json", [line(**row) for row in ROWS] + [b"", b"   ", b"\t", b""])

    assert [e.raw for e in read_pairs(path, AFQMC, require_label=True)] == ROWS


# --- bad input: one line, FILE:LINE: what is wrong ----------------------------------------------------------

BAD_LINES = {
    "not JSON": (b'{"sentence1": "a", "sentence2": ', "not valid JSON"),
    "JSON array, not an object": (b'["a", "b", "1"]', "expected a JSON object, got list"),
    "JSON string, not an object": (b'"a b 1"', "expected a JSON object, got str"),
    "missing sentence1": (line(sentence2="花呗", label="1"), "missing key 'sentence1'"),
    "missing sentence2": (line(sentence1="花呗", label="1"), "missing key 'sentence2'"),
    "missing label": (line(sentence1="花呗", sentence2="借呗"), "missing key 'label'"),
    "empty sentence": (line(sentence1="", sentence2="借呗", label="1"), "'sentence1' is empty"),
    "whitespace-only sentence": (line(sentence1="花呗", sentence2=" \t\u3000 ", label="1"), "'sentence2' is empty"),
    "number as sentence": (line(sentence1="花呗", sentence2=123, label="1"), "'sentence2' must be a string, got int"),
    "null as sentence": (line(sentence1=None, sentence2="借呗", label="1"), "'sentence1' must be a string"),
    "label outside the label set": (line(sentence1="花呗", sentence2="借呗", label="2"), "label '2' is not one of"),
    "boolean label": (line(sentence1="花呗", sentence2="借呗", label=True), "label True is not one of"),
    "invalid UTF-8": (b'{"sentence1": "\xe8\x8a", "sentence2": "b", "label": "1"}', "not valid UTF-8"),
}


@pytest.mark.parametrize("bad, message", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_is_a_one_line_error_naming_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "train.json", [GOOD, GOOD, bad, GOOD])

    error = user_error(path)

    assert "\n" not in error
    assert error.startswith(f"{path}:3: ")
    assert message in error


def test_label_error_lists_the_allowed_labels(tmp_path):
    path = write_lines(tmp_path / "train.json", [line(sentence1="花呗", sentence2="借呗", label="yes")])

    assert user_error(path) == f"{path}:1: label 'yes' is not one of '0', '1' (see --label_list)"


def test_blank_line_followed_by_more_data_is_an_error_at_the_blank_line(tmp_path):
    path = write_lines(tmp_path / "train.json", [GOOD, GOOD, b"", b"  ", GOOD])

    error = user_error(path)

    assert "\n" not in error
    assert error.startswith(f"{path}:3: ")
    assert "empty line" in error


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"], ids=["empty", "blank lines", "only a BOM"])
def test_file_without_examples_is_an_error(tmp_path, content):
    path = write_bytes(tmp_path / "train.json", content)

    assert user_error(path) == f"{path}: no examples in file"


def test_first_bad_line_is_reported(tmp_path):
    path = write_lines(tmp_path / "train.json", [GOOD, b"[1]", b"{oops"])

    assert user_error(path).startswith(f"{path}:2: ")


# --- unlabelled files and other datasets --------------------------------------------------------------------


def test_unlabelled_test_file_reads_without_labels_and_keeps_ids(tmp_path):
    rows = [{"id": i, "sentence1": r["sentence1"], "sentence2": r["sentence2"]} for i, r in enumerate(ROWS)]
    path = str(write_jsonl(tmp_path / "test.json", rows))

    examples = read_pairs(path, AFQMC, require_label=False)

    assert [e.label for e in examples] == [None, None, None]
    assert [e.raw["id"] for e in examples] == [0, 1, 2]
    assert user_error(path).startswith(f"{path}:1: missing key 'label'")  # but it is no training file


def test_unlabelled_reading_ignores_labels_outside_the_label_set(tmp_path):
    path = write_lines(tmp_path / "test.json", [line(id=0, sentence1="花呗", sentence2="借呗", label="")])

    assert read_pairs(path, AFQMC, require_label=False)[0].label is None


LCQMC = PairSchema(sentence1_key="text_a", sentence2_key="text_b", label_key="y", label_list=("0", "1"))


def test_lcqmc_like_keys_and_integer_labels_work_with_a_custom_schema(tmp_path):
    rows = [{"text_a": "喜欢打篮球的男生", "text_b": "爱打篮球的男生", "y": 1},
            {"text_a": "我手机丢了", "text_b": "我想换个手机", "y": 0}]
    path = str(write_jsonl(tmp_path / "lcqmc.json", rows))

    examples = read_pairs(path, LCQMC, require_label=True)

    assert [(e.sentence1, e.sentence2, e.label) for e in examples] == [
        ("喜欢打篮球的男生", "爱打篮球的男生", 1), ("我手机丢了", "我想换个手机", 0)]
    assert user_error(path, AFQMC).startswith(f"{path}:1: missing key 'sentence1'")


def test_custom_schema_errors_name_the_custom_keys(tmp_path):
    path = write_lines(tmp_path / "lcqmc.json", [line(text_a="a", text_b="b", y=1), line(text_a="a", text_b="b")])

    assert user_error(path, LCQMC) == f"{path}:2: missing key 'y'"


# --- collation with a real tokenizer ------------------------------------------------------------------------

VOCAB_CHARS = sorted(set("".join(r["sentence1"] + r["sentence2"] for r in ROWS) + "的了是"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert-data")
    build_tiny_bert(str(path), vocab=SPECIAL_TOKENS + VOCAB_CHARS, hidden_size=32, num_layers=1, num_heads=2)
    return AutoTokenizer.from_pretrained(str(path))


def encoded(tokenizer, *pairs, labels=None, max_length=64) -> PairDataset:
    labels = labels or [None] * len(pairs)
    dataset = PairDataset([PairExample(s1, s2, label, {}) for (s1, s2), label in zip(pairs, labels, strict=True)])
    dataset.encode(tokenizer, max_length)
    return dataset


def collate(tokenizer, dataset, indices=None, **options) -> dict:
    return PairCollator(tokenizer.pad_token_id, **options)([dataset[i] for i in indices or range(len(dataset))])


def test_pair_is_encoded_as_cls_s1_sep_s2_sep(tokenizer):
    batch = collate(tokenizer, encoded(tokenizer, ("花呗如何还款", "借呗")))

    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == ["[CLS]", *"花呗如何还款", "[SEP]", *"借呗", "[SEP]"]
    assert batch["token_type_ids"][0].tolist() == [0] * 8 + [1] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 11
    assert "[UNK]" not in tokens


def test_encoding_once_gives_what_the_tokenizer_gives_batch_by_batch(tokenizer):
    pairs = [("花呗如何还款", "借呗"), ("花呗", "花呗怎么还钱"), ("为什么不能开通花呗" * 9, "借呗")]
    batch = collate(tokenizer, encoded(tokenizer, *pairs, max_length=20))

    direct = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True, max_length=20, padding=True,
                       return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert batch[key].tolist() == direct[key].tolist()


def test_batch_is_padded_to_its_longest_pair_not_to_max_length(tokenizer):
    batch = collate(tokenizer, encoded(tokenizer, ("花呗", "借呗"), ("花呗如何还款", "花呗怎么还钱")))

    assert batch["input_ids"].shape == (2, 15)  # 6 + 6 characters + [CLS] + 2 [SEP]
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0] * 8
    assert batch["input_ids"][0, 7:].tolist() == [tokenizer.pad_token_id] * 8
    assert batch["attention_mask"][1].tolist() == [1] * 15


def test_pad_to_multiple_of_rounds_the_batch_length_up(tokenizer):
    batch = collate(tokenizer, encoded(tokenizer, ("花呗", "借呗"), ("花呗如何还款", "花呗怎么还钱")),
                    pad_to_multiple_of=8)

    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 7 + 15


def test_long_pairs_are_truncated_to_max_length(tokenizer):
    long_pair = ("花呗如何还款" * 3, "为什么不能开通花呗" * 3)
    batch = collate(tokenizer, encoded(tokenizer, long_pair, ("花呗", "借呗"), max_length=10))

    assert batch["input_ids"].shape == (2, 10)
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.sep_token_id) == 2  # both sentences keep a share
    assert batch["token_type_ids"][0].tolist()[-1] == 1


def test_batch_carries_dataset_index_and_labels(tokenizer):
    dataset = encoded(tokenizer, ("花呗", "借呗"), ("还款", "还钱"), ("花呗", "花呗"), labels=[1, 0, 1])

    batch = collate(tokenizer, dataset, [2, 0])

    assert dataset[1]["index"] == 1 and dataset[1]["label"] == 0
    assert batch["index"].tolist() == [2, 0]
    assert batch["labels"].tolist() == [1, 1]
    assert not batch["labels"].is_floating_point()  # class ids for cross-entropy
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "index", "labels", "weight"}
    assert batch["weight"].tolist() == [1.0, 1.0]


def test_items_past_the_end_are_weight_0_copies_for_topping_up_the_last_global_batch(tokenizer):
    dataset = encoded(tokenizer, ("花呗", "借呗"), ("还款", "还钱"), labels=[1, 0])

    batch = collate(tokenizer, dataset, [1, 0, 2 + 1])

    assert len(dataset) == 2
    assert batch["index"].tolist() == [1, 0, 1] and batch["labels"].tolist() == [0, 1, 0]
    assert batch["weight"].tolist() == [1.0, 1.0, 0.0]
    assert torch.equal(batch["input_ids"][2], batch["input_ids"][0])


def test_unlabelled_batch_has_no_labels(tokenizer):
    batch = collate(tokenizer, encoded(tokenizer, ("花呗", "借呗"), ("还款", "还钱")), [1, 0])

    assert "labels" not in batch
    assert batch["index"].tolist() == [1, 0]


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


# --- streaming ----------------------------------------------------------------------------------------------


def numbered_rows(n: int) -> list[dict]:
    return [{"sentence1": f"句子{i}", "sentence2": f"问题{i}", "label": str(i % 2)} for i in range(n)]


@pytest.fixture
def stream_file(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "train.json", numbered_rows(25)))


# Stream items are tokenised as they stream by; any tokenizer knowing these characters will do.
STREAM_TOKENIZER = BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + list("句子问题0123456789"))})


def stream(path: str, seed: int, buffer_size: int = 8, limit: int | None = None, tokenizer=None):
    dataset = StreamingPairDataset(path, AFQMC, seed=seed, buffer_size=buffer_size, limit=limit)
    dataset.encode(tokenizer or STREAM_TOKENIZER, max_length=32)
    return dataset


def epoch_order(path: str, seed: int, epoch: int, buffer_size: int = 8, limit: int | None = None) -> list[int]:
    dataset = stream(path, seed, buffer_size, limit)
    dataset.set_epoch(epoch)
    return [item["index"] for item in dataset]


def test_stream_yields_every_example_once_per_epoch_tokenised(stream_file):
    tokenizer = STREAM_TOKENIZER
    dataset = stream(stream_file, seed=3)

    for epoch in range(3):
        dataset.set_epoch(epoch)
        seen = list(dataset)
        assert sorted(item["index"] for item in seen) == list(range(25))
        assert all(item["label"] == item["index"] % 2 for item in seen)
        first = tokenizer.decode(seen[0]["input_ids"], skip_special_tokens=True).replace(" ", "")
        assert first == f"句子{seen[0]['index']}问题{seen[0]['index']}"


def test_stream_is_shuffled(stream_file):
    assert epoch_order(stream_file, seed=3, epoch=0) != list(range(25))


def test_stream_order_depends_only_on_seed_and_epoch(stream_file):
    order = epoch_order(stream_file, seed=3, epoch=1)

    assert epoch_order(stream_file, seed=3, epoch=1) == order  # a fresh dataset (another process) agrees
    assert epoch_order(stream_file, seed=3, epoch=2) != order
    assert epoch_order(stream_file, seed=4, epoch=1) != order

    dataset = stream(stream_file, seed=3)
    dataset.set_epoch(1)
    assert [item["index"] for item in dataset] == [item["index"] for item in dataset] == order  # no hidden state


def test_stream_len_counts_examples_and_respects_limit(stream_file):
    assert len(StreamingPairDataset(stream_file, AFQMC, seed=0, buffer_size=8)) == 25
    assert len(StreamingPairDataset(stream_file, AFQMC, seed=0, buffer_size=8, limit=100)) == 25
    assert len(StreamingPairDataset(stream_file, AFQMC, seed=0, buffer_size=8, limit=10)) == 10
    assert sorted(epoch_order(stream_file, seed=0, epoch=0, limit=10)) == list(range(10))


@pytest.mark.parametrize("bad_line", [1, 13, 25])
@pytest.mark.parametrize("limit", [None, 5])
def test_stream_bad_line_anywhere_raises_at_construction(tmp_path, bad_line, limit):
    lines = [line(**row) for row in numbered_rows(25)]
    lines[bad_line - 1] = line(sentence1="句子", sentence2="", label="1")
    path = write_lines(tmp_path / "train.json", lines)

    with pytest.raises(UserError) as info:
        StreamingPairDataset(path, AFQMC, seed=0, buffer_size=8, limit=limit)

    assert str(info.value) == f"{path}:{bad_line}: 'sentence2' is empty"


def test_stream_of_empty_file_raises_at_construction(tmp_path):
    path = write_bytes(tmp_path / "train.json", b"\n")

    with pytest.raises(UserError, match="no examples"):
        StreamingPairDataset(path, AFQMC, seed=0, buffer_size=8)


@pytest.mark.parametrize("num_examples", [24, 11])
def test_two_process_shards_split_each_global_batch_and_top_up_the_last_with_weight_0_copies(tmp_path, num_examples):
    """What `accelerator.prepare` (split_batches) does with --streaming on 2 processes: each one reads the whole
    stream (same seed and epoch) and keeps its slice of every micro-batch of 2 x B pairs."""
    path = str(write_jsonl(tmp_path / "train.json", numbered_rows(num_examples)))
    per_device = 3
    shards = []
    for rank in (0, 1):
        dataset = stream(path, seed=5, buffer_size=4)
        dataset.pad_to = 2 * per_device
        shards.append(IterableDatasetShard(dataset, batch_size=2 * per_device, num_processes=2, process_index=rank,
                                           split_batches=True))
        shards[-1].set_epoch(2)
    items = [list(shard) for shard in shards]

    assert len(items[0]) == len(items[1])  # every process takes part in every step
    # Put the per-process slices back together: the real pairs are the epoch's order, each once.
    merged = [item for start in range(0, len(items[0]), per_device) for rank in (0, 1)
              for item in items[rank][start:start + per_device]]
    real = [item["index"] for item in merged[:num_examples]]
    assert real == epoch_order(path, seed=5, epoch=2, buffer_size=4)
    assert sorted(real) == list(range(num_examples))
    # Copies only at the end, and only up to the end of the last micro-batch.
    missing = -num_examples % (2 * per_device)
    assert [item["weight"] for item in merged] == [1.0] * num_examples + [0.0] * missing
    assert {item["index"] for item in merged[num_examples:]} <= set(real)


# --- the real bert-base-chinese vocabulary (needs ../shared) ------------------------------------------------

VOCAB_FILE = SHARED / "data" / "bert-base-chinese-tokenizer" / "vocab.txt"
AFQMC_TRAIN = SHARED / "data" / "afqmc" / "train.json"
needs_vocab = pytest.mark.skipif(not VOCAB_FILE.is_file() or not AFQMC_TRAIN.is_file(),
                                 reason="needs ../shared/data (bert-base-chinese vocab and AFQMC)")


@pytest.fixture(scope="module")
def chinese_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert-zh")
    build_tiny_bert(str(path), vocab_file=str(VOCAB_FILE), hidden_size=32, num_layers=1, num_heads=2)
    return AutoTokenizer.from_pretrained(str(path))


@needs_vocab
def test_tiny_bert_with_the_bert_base_chinese_vocab_keeps_its_token_ids(chinese_tokenizer):
    assert len(chinese_tokenizer) == 21128
    assert chinese_tokenizer("花呗全额还清怎么显示没有还款")["input_ids"][:3] == [101, 5709, 1446]
    assert chinese_tokenizer.convert_ids_to_tokens([5709, 1446]) == ["花", "呗"]


@needs_vocab
def test_bert_base_chinese_vocab_covers_afqmc_sentences(chinese_tokenizer):
    """On the first 200 training pairs, [UNK] only stands for text the vocabulary really lacks."""
    vocab = set(VOCAB_FILE.read_text(encoding="utf-8").split("\n"))
    examples = read_pairs(str(AFQMC_TRAIN), AFQMC, require_label=True, limit=200)
    unknown = []
    for example in examples:
        for text in (example.sentence1, example.sentence2):
            encoding = chinese_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
            unknown += [text[a:b] for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
                        if i == chinese_tokenizer.unk_token_id]

    assert all(piece.lower() not in vocab for piece in unknown), unknown
    assert len(unknown) <= 2  # the two "…" of line 46: bert-base-chinese has no U+2026
