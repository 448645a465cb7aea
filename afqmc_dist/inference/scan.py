"""The first pass over a file to predict or test: every line checked before the model is loaded, holding nothing.

One streaming read of the file: each line is checked as pairs.py checks every pair file (FILE:LINE on the first bad
one; the ids unique, checked on disk), its byte offset noted where a piece starts (pieces.py), and a sha256 of its
lines computed on the way. The memory the pass needs does not grow with the file: a file of 10^8 pairs is scanned
in the memory of a file of ten (the piece offsets aside: 8 bytes per piece).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..errors import UserError
from ..pairs import PairExample, PairSchema, decode, located_pairs, parse_line


@dataclass
class InputIndex:
    """What the scan learned of a file: its pairs, where each piece starts, whether every line has an id."""

    path: str
    count: int  # pairs (non-blank lines)
    piece_size: int
    starts: list[int] = field(default_factory=list)  # byte offset of the first line of each piece
    has_ids: bool = True
    sha256: str = ""

    @property
    def pieces(self) -> int:
        return len(self.starts)

    def piece_range(self, piece: int) -> tuple[int, int]:
        """(first pair, number of pairs) of piece `piece`."""
        first = piece * self.piece_size
        return first, min(self.piece_size, self.count - first)


def scan(path: str, schema: PairSchema, require_label: bool, piece_size: int) -> InputIndex:
    """Check every line of `path` (UserError naming FILE:LINE) and index it in pieces of `piece_size` pairs."""
    index = InputIndex(path, 0, piece_size)
    digest = hashlib.sha256()
    for offset, raw, example in located_pairs(path, schema, require_label):
        digest.update(raw)
        if index.count % piece_size == 0:
            index.starts.append(offset)
        index.count += 1
        index.has_ids = index.has_ids and schema.id_key in example.raw
    if index.count == 0:
        raise UserError(f"{path}: no examples in file")
    index.has_ids = index.has_ids and not require_label
    index.sha256 = digest.hexdigest()
    return index


def read_piece(index: InputIndex, piece: int, schema: PairSchema, require_label: bool) -> list[PairExample]:
    """The pairs of piece `piece`, read from its offset (the file was checked by `scan`)."""
    first, count = index.piece_range(piece)
    examples = []
    with open(index.path, "rb") as f:
        f.seek(index.starts[piece])
        lineno = 2 if index.starts[piece] else 1  # only the first line may start with a byte-order mark
        for raw in f:
            text = decode(raw, lineno)
            if text:
                examples.append(parse_line(text, f"{index.path}:{first + len(examples) + 1}", schema, require_label))
                if len(examples) == count:
                    break
    return examples
