"""Read what an offline W&B run recorded, from its `run-*.wandb` file (wandb ships no reader for it).

The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of records
`crc32 u32 | length u16 | type u8 | data`, where a record of type FULL (1) holds a whole payload and FIRST (2),
MIDDLE (3), LAST (4) hold pieces of one. Each payload is a `wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER, BLOCK, RECORD_HEADER = 7, 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """The `wandb_internal_pb2.Record`s of a run file (tests that call this are marked `requires("wandb")`)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + RECORD_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_run(path: Path) -> tuple[dict, dict, list[dict]]:
    """(summary, config, history) of a run file: the final summary and config (later updates win) as dicts,
    and one dict per logged history row, in order."""
    summary, config, history = {}, {}, []
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            history.append(_items(record.history.item))
    return summary, config, history
