"""Specification of the data layer: datasets, collation, streaming (with processes and DataLoader workers) and
the DataLoaders of a run. Reading files: test_pairs.py; tokenising and its cache: test_encoding.py."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import IterableDatasetShard
from conftest import SHARED, write_jsonl
from pair_files import VOCAB_CHARS, line, write_bytes, write_lines
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, BertTokenizer

from afqmc_dist.config import RunConfig
from afqmc_dist.data import (
    PairCollator,
    PairDataset,
    PairExample,
    PairSchema,
    StreamingPairDataset,
    make_eval_dataloader,
    make_train_dataloader,
    read_pairs,
)
from afqmc_dist.errors import UserError
from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert

AFQMC = PairSchema()


# --- collation with a real tokenizer ------------------------------------------------------------------------

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


def loader_batches(dataset, workers: int, batch_size: int) -> list[tuple]:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=PairCollator(0))
    return [(b["index"].tolist(), b["weight"].tolist(), b["input_ids"].tolist()) for b in loader]


@pytest.mark.parametrize("num_examples", [25, 24])
def test_stream_workers_give_the_batches_one_reader_gives_in_the_same_order(tmp_path, num_examples):
    """DataLoader workers take turns batch by batch: each keeps only its batches of the stream, so 2 workers yield
    every pair once (with the weight-0 top-up at the end), exactly as without workers. Also under accelerate's
    per-process slicing of each micro-batch of 2 x 3 pairs (what `prepare` builds on 2 processes)."""
    path = str(write_jsonl(tmp_path / "train.json", numbered_rows(num_examples)))
    dataset = stream(path, seed=5, buffer_size=4)
    dataset.pad_to = dataset.batch_size = 6
    dataset.set_epoch(1)

    alone = loader_batches(dataset, 0, 6)
    assert loader_batches(dataset, 2, 6) == alone
    weights = [w for _, batch_weights, _ in alone for w in batch_weights]
    assert weights == [1.0] * num_examples + [0.0] * (-num_examples % 6)
    indices = [i for batch_indices, _, _ in alone for i in batch_indices]
    assert sorted(indices[:num_examples]) == list(range(num_examples))
    for rank in (0, 1):
        shard = IterableDatasetShard(dataset, batch_size=6, num_processes=2, process_index=rank, split_batches=True)
        assert loader_batches(shard, 2, 3) == loader_batches(shard, 0, 3)


@pytest.fixture
def accelerator(fresh_accelerate_state):
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_stream_workers_follow_set_epoch_through_the_training_loader(tmp_path, accelerator):
    """Persistent workers would keep the dataset copy of the first epoch (and its order) for every epoch."""
    path = str(write_jsonl(tmp_path / "train.json", numbered_rows(20)))
    cfg = RunConfig(streaming=True, dataloader_num_workers=2, batch_size=4, shuffle_buffer_size=8, seed=3)
    dataset = StreamingPairDataset(path, AFQMC, seed=3, buffer_size=8)
    dataset.encode(STREAM_TOKENIZER, max_length=32)
    loader = accelerator.prepare(make_train_dataloader(dataset, cfg, cfg.batch_plan(1), STREAM_TOKENIZER,
                                                       accelerator))
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen = [i for batch in loader for i in batch["index"].tolist()]
        assert seen == epoch_order(path, seed=3, epoch=epoch)


def test_map_style_workers_persist_across_epochs(tmp_path, accelerator, tokenizer):
    cfg = RunConfig(dataloader_num_workers=1, batch_size=2)
    dataset = encoded(tokenizer, ("花呗", "借呗"), ("还款", "还钱"), labels=[1, 0])

    assert make_train_dataloader(dataset, cfg, cfg.batch_plan(1), tokenizer, accelerator).persistent_workers


def test_pad_to_multiple_of_never_pads_beyond_max_seq_length(tokenizer, accelerator):
    """130 tokens rounded up to a multiple of 8 would be 136: more positions than the run checked the model has."""
    cfg = RunConfig(max_seq_length=130, pad_to_multiple_of=8, eval_batch_size=4)
    long_pair = ("花呗如何还款" * 30, "为什么不能开通花呗" * 30)
    plan = cfg.batch_plan(1)

    (long_batch,) = make_eval_dataloader(encoded(tokenizer, long_pair, ("花呗", "借呗"), max_length=130), cfg, plan,
                                         tokenizer, accelerator)
    (short_batch,) = make_eval_dataloader(encoded(tokenizer, ("花呗", "借呗"), max_length=130), cfg, plan, tokenizer,
                                          accelerator)

    assert long_batch["input_ids"].shape == (2, 130)
    assert short_batch["input_ids"].shape == (1, 8)  # 7 tokens, rounded up as asked


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
