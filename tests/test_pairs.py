"""Specification of reading pair files: valid files, and every bad line refused as one `FILE:LINE: ...` error."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl
from pair_files import GOOD, ROWS, line, write_bytes, write_lines

from afqmc_dist.errors import UserError
from afqmc_dist.pairs import PairSchema, read_pairs

AFQMC = PairSchema()


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
    # Valid JSON whose \u escape decodes to half a surrogate pair: the tokenizer or the prediction writer fails later.
    "lone surrogate in a sentence": (b'{"sentence1": "a\\ud800", "sentence2": "b", "label": "1"}',
                                     "'sentence1' holds '\\ud800', a lone UTF-16 surrogate"),
    "lone surrogate in an extra field": (b'{"sentence1": "a", "sentence2": "b", "label": "1", "id": "x\\udfff"}',
                                         "'id' holds '\\udfff', a lone UTF-16 surrogate"),
    "lone surrogate deep in an extra field": (
        b'{"sentence1": "a", "sentence2": "b", "label": "1", "meta": {"tags": ["ok", {"k": "\\udc80"}]}}',
        "'meta' holds '\\udc80'"),
    "lone surrogate in a key": (b'{"sentence1": "a", "sentence2": "b", "label": "1", "\\ud83d": 1}',
                                "a key holds '\\ud83d'"),
    "label of 5000 digits": (b'{"sentence1": "a", "sentence2": "b", "label": ' + b"1" * 5000 + b"}",
                             "not valid JSON here (Exceeds the limit (4300 digits)"),
    "100k nested lists": (b'{"sentence1": "a", "sentence2": "b", "label": "1", "x": ' + b"[" * 100_000 + b"}",
                          "nested too deeply to be read"),
    "NaN in an extra field": (b'{"sentence1": "a", "sentence2": "b", "label": "1", "score": NaN}',
                              "not valid JSON here (NaN is not a JSON value)"),
}


@pytest.mark.parametrize("bad, message", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_is_a_one_line_error_naming_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "train.json", [GOOD, GOOD, bad, GOOD])

    error = user_error(path)

    assert "\n" not in error
    assert error.startswith(f"{path}:3: ")
    assert message in error


def test_a_surrogate_pair_escape_is_one_character_and_fine(tmp_path):
    path = write_lines(tmp_path / "train.json", [b'{"sentence1": "\\ud83d\\ude00", "sentence2": "b", "label": "1"}'])

    assert read_pairs(path, AFQMC, require_label=True)[0].sentence1 == "\U0001F600"


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


BAD_IDS = {"null": (None, "got null"), "list": ([1, 2], "got list"), "object": ({"n": 1}, "got dict"),
           "boolean": (True, "got bool")}


@pytest.mark.parametrize("value, message", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_a_predict_file_id_that_is_not_a_string_or_number_is_refused(tmp_path, value, message):
    path = write_lines(tmp_path / "test.json", [line(id=0, sentence1="花呗", sentence2="借呗"),
                                                line(id=value, sentence1="还款", sentence2="还钱")])

    assert user_error(path, require_label=False) == \
        f"{path}:2: id 'id' must be a string or a number, {message}"


def test_a_duplicate_id_names_both_lines(tmp_path):
    rows = [line(id=i, sentence1="花呗", sentence2="借呗") for i in (0, 1, 2)]
    rows.append(line(id="1", sentence1="a", sentence2="b"))
    path = write_lines(tmp_path / "test.json", rows)

    error = user_error(path, require_label=False)

    assert error.startswith(f"{path}:4: id '1' is also the id of line 2; every id must be unique")


def test_ids_are_checked_in_files_to_predict_only_and_may_be_absent(tmp_path):
    same_ids = write_lines(tmp_path / "train.json", [line(id=7, sentence1="花呗", sentence2="借呗", label="1")] * 2)
    no_ids = write_lines(tmp_path / "test.json", [line(sentence1="花呗", sentence2="借呗")] * 2)

    assert len(read_pairs(same_ids, AFQMC, require_label=True)) == 2  # a training file's ids are not used
    assert len(read_pairs(no_ids, AFQMC, require_label=False)) == 2  # no ids: no CLUE file, nothing to check


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
