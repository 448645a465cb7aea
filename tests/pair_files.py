"""JSON-lines pair files for tests: sample rows and ways to write exact bytes (bad lines included)."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = [
    {"sentence1": "花呗如何还款", "sentence2": "花呗怎么还钱", "label": "1"},
    {"sentence1": "借呗能提前还吗", "sentence2": "花呗可以分期吗", "label": "0"},
    {"sentence1": "我的花呗开通不了", "sentence2": "为什么不能开通花呗", "label": "1"},
]
GOOD = json.dumps(ROWS[0], ensure_ascii=False).encode()
VOCAB_CHARS = sorted(set("".join(r["sentence1"] + r["sentence2"] for r in ROWS) + "的了是"))


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def write_lines(path: Path, lines: list[bytes], end: bytes = b"\n") -> str:
    return write_bytes(path, b"".join(line + end for line in lines))


def line(**fields) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()
