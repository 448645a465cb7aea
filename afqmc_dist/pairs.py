"""Reading sentence-pair files: JSON lines, each checked while it is read, the first bad one reported as FILE:LINE.

A file holds one JSON object per line, e.g. AFQMC's
    {"sentence1": "花呗如何还款", "sentence2": "花呗怎么还钱", "label": "1"}
Test files carry "id" and no "label". Keys and label values are configurable (`PairSchema`), so LCQMC, BQ and
other datasets of this shape work unchanged.

Everything a later stage relies on is checked here, so that a bad line stops the run before any model is loaded
or any file written, as one line `FILE:LINE: what is wrong` (a UserError):
- the line is UTF-8, a JSON object, with no NaN/Infinity (they would make the prediction files invalid JSON), no
  number the JSON reader refuses (Python reads at most 4300 digits) and no nesting deeper than it can read;
- every string of the line, keys included, is text that UTF-8 can encode: JSON's `\\ud800` escapes decode to a
  lone UTF-16 surrogate, on which the tokenizer (sentences) or the prediction writer (other fields, copied into
  the predictions) would fail mid-run;
- the two sentences are non-empty strings, the label (when required) is one of the label list;
- in an unlabelled file (a predict input), the ids, where lines carry one, are scalars and unique: CLUE's
  submission file pairs each prediction with its id.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import UserError, first_line

ID_BATCH = 10_000  # ids checked per SQLite transaction


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


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def unencodable(text: str) -> int | None:
    """The position of the first character of `text` that UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _check_text(obj: dict, where: str) -> None:
    """Raise UserError if any string of `obj` (keys included, at any depth) holds a lone surrogate."""
    for key, value in obj.items():
        stack = [key, value]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                stack += item
            elif isinstance(item, str) and (at := unencodable(item)) is not None:
                what = "a key" if unencodable(key) is not None else repr(key)
                raise UserError(f"{where}: {what} holds {item[at]!a}, a lone UTF-16 surrogate (half of a "
                                "\\u escape pair), which is not text; fix how the file was written")


def parse_line(text: str, where: str, schema: PairSchema, require_label: bool) -> PairExample:
    """One line's example, every check of the module docstring made (UserError `where: what is wrong`)."""
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # NaN/Infinity, or an integer of more than 4300 digits
        raise UserError(f"{where}: not valid JSON here ({first_line(e)})") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be read") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "\\u" in text:  # only a \u escape can produce a lone surrogate: raw UTF-8 bytes cannot encode one
        _check_text(obj, where)
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


def id_key_of(example: PairExample, id_key: str, where: str) -> str | None:
    """The id of an unlabelled line as CLUE's submission file keys it (7 and "7" are the same line there), or
    None when the line has none. UserError unless it is a string or a number."""
    if id_key not in example.raw:
        return None  # lines without ids: predictions.jsonl only, no CLUE file
    value = example.raw[id_key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{where}: id {id_key!r} must be a string or a number, got {kind}")
    return str(value)


class UniqueIds:
    """The ids of an unlabelled file, for CLUE's submission file: none twice. Held in a temporary SQLite table on
    disk, so that checking a file of 10^8 ids takes the memory of ten. `add` collects; `flush` (every ID_BATCH ids,
    and at the end) finds the first line whose id an earlier line already had."""

    def __init__(self, path: str, id_key: str):
        self.path, self.id_key = path, id_key
        self.folder = tempfile.TemporaryDirectory(prefix="afqmc-ids-")
        self.db = sqlite3.connect(os.path.join(self.folder.name, "ids.db"))
        self.db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
        self.pending: list[tuple[str, int, object]] = []

    def add(self, example: PairExample, lineno: int) -> None:
        """Note the line's id, if it has one."""
        key = id_key_of(example, self.id_key, f"{self.path}:{lineno}")
        if key is None:
            return
        self.pending.append((key, lineno, example.raw[self.id_key]))
        if len(self.pending) >= ID_BATCH:
            self.flush()

    def flush(self) -> None:
        try:
            with self.db:
                self.db.executemany("INSERT INTO ids VALUES (?, ?)", [(key, line) for key, line, _ in self.pending])
        except sqlite3.IntegrityError:
            self._name_the_duplicate()
        self.pending.clear()

    def _name_the_duplicate(self) -> None:
        """The batch held an id seen before: find its first repeat, one row at a time, and say so."""
        for key, lineno, value in self.pending:
            row = self.db.execute("SELECT line FROM ids WHERE id = ?", (key,)).fetchone()
            if row is not None:
                raise UserError(f"{self.path}:{lineno}: id {value!r} is also the id of line {row[0]}; every id "
                                "must be unique (CLUE's file has one prediction per id)")
            self.db.execute("INSERT INTO ids VALUES (?, ?)", (key, lineno))

    def close(self) -> None:
        self.db.close()
        self.folder.cleanup()


def decode(raw: bytes, lineno: int) -> str:
    """A line's text, stripped (a byte-order mark on the first line left out); UnicodeDecodeError if not UTF-8."""
    return (raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw).decode("utf-8").strip()


def located_pairs(path: str, schema: PairSchema, require_label: bool) -> Iterator[tuple[int, bytes, PairExample]]:
    """(byte offset, line as read, example) of every pair of `path`, in file order, reading one line at a time.

    Tolerates a UTF-8 byte-order mark, CRLF line ends and blank lines at the end of the file; a blank line
    followed by more data is an error (it would shift every later line number). Without `require_label` (a file
    to predict), ids are checked too (see the module docstring), on disk (UniqueIds).
    """
    blank_at = None
    ids = None if require_label else UniqueIds(path, schema.id_key)
    try:
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                try:
                    text = decode(raw, lineno)
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno}: not valid UTF-8") from None
                if not text:
                    blank_at = blank_at or lineno
                    continue
                if blank_at is not None:
                    raise UserError(f"{path}:{blank_at}: empty line")
                example = parse_line(text, f"{path}:{lineno}", schema, require_label)
                if ids is not None:
                    ids.add(example, lineno)
                yield start, raw, example
        if ids is not None:
            ids.flush()
    finally:
        if ids is not None:
            ids.close()


def iter_pairs(path: str, schema: PairSchema, require_label: bool) -> Iterator[PairExample]:
    """Yield validated examples of `path` in file order (see located_pairs)."""
    for _, _, example in located_pairs(path, schema, require_label):
        yield example


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
