"""inference/: the streaming first pass (scan.py) and the pieces of a prediction (pieces.py), on real files.

The processes that predict, get killed and continue are in test_predict_resume.py.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import read_jsonl, synthetic_pairs, write_jsonl

from afqmc_dist import pairs as pairs_module
from afqmc_dist.errors import UserError
from afqmc_dist.inference.pieces import Pieces, parts_folder
from afqmc_dist.inference.scan import read_piece, scan
from afqmc_dist.pairs import PairSchema, read_pairs

SCHEMA = PairSchema()
JOB = {"input": {"sha256": "a" * 64, "pairs": 25}, "model": "b" * 64, "piece_size": 10, "batch_size": 8}


def unlabelled(n: int, seed: int = 1) -> list[dict]:
    return [{"id": i, "sentence1": r["sentence1"], "sentence2": r["sentence2"]}
            for i, r in enumerate(synthetic_pairs(n, seed))]


# --- scan.py ----------------------------------------------------------------------------------------------------


def test_every_piece_read_back_from_its_offset_holds_the_files_pairs_in_order(tmp_path):
    path = write_jsonl(tmp_path / "pairs.json", unlabelled(25))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes() + b"\n\n")  # a byte-order mark, blank lines at the end

    index = scan(str(path), SCHEMA, require_label=False, piece_size=10)

    assert (index.count, index.pieces, index.has_ids) == (25, 3, True)
    read_back = [e.raw for piece in range(index.pieces) for e in read_piece(index, piece, SCHEMA, False)]
    assert read_back == [e.raw for e in read_pairs(str(path), SCHEMA, False)]
    assert [len(read_piece(index, p, SCHEMA, False)) for p in range(3)] == [10, 10, 5]


def test_the_index_knows_when_some_line_has_no_id(tmp_path):
    rows = unlabelled(5)
    del rows[3]["id"]
    index = scan(str(write_jsonl(tmp_path / "pairs.json", rows)), SCHEMA, require_label=False, piece_size=2)

    assert not index.has_ids


def test_a_bad_line_deep_in_a_big_file_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "big.json"
    lines = [json.dumps(r, ensure_ascii=False) for r in unlabelled(20_000)]
    lines[12_344] = '{"id": 12344, "sentence1": "的了"}'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(UserError, match=rf"^{path}:12345: missing key 'sentence2'"):
        scan(str(path), SCHEMA, require_label=False, piece_size=1000)


def test_a_repeated_id_is_found_across_the_batches_of_the_id_table(tmp_path, monkeypatch):
    """Ids go to SQLite in batches (ID_BATCH): a repeat of an id of an earlier batch names both lines."""
    monkeypatch.setattr(pairs_module, "ID_BATCH", 4)
    rows = unlabelled(11)
    rows[9]["id"] = "2"  # the id of line 3, as a string: CLUE's file would hold id 2 twice
    path = write_jsonl(tmp_path / "pairs.json", rows)

    with pytest.raises(UserError, match=rf"^{path}:10: id '2' is also the id of line 3; every id must be unique"):
        scan(str(path), SCHEMA, require_label=False, piece_size=5)


def test_the_fingerprint_changes_with_any_line_and_not_with_trailing_blank_lines(tmp_path):
    rows = unlabelled(6)
    first = scan(str(write_jsonl(tmp_path / "a.json", rows)), SCHEMA, False, 4).sha256
    (tmp_path / "b.json").write_bytes((tmp_path / "a.json").read_bytes() + b"\n")
    rows[4]["sentence2"] += "的"
    changed = scan(str(write_jsonl(tmp_path / "c.json", rows)), SCHEMA, False, 4).sha256

    assert scan(str(tmp_path / "b.json"), SCHEMA, False, 4).sha256 == first
    assert changed != first


# --- pieces.py --------------------------------------------------------------------------------------------------


def lines_of(piece: int) -> list[str]:
    return [json.dumps({"piece": piece, "n": n}) + "\n" for n in range(3)]


def written_pieces(tmp_path, pieces: list[int], job: dict = JOB) -> Pieces:
    store = Pieces(str(tmp_path / "out.jsonl"), job)
    store.open(restart=False)
    for piece in pieces:
        store.write(piece, lines_of(piece), [json.dumps({"id": piece}) + "\n"])
    return store


def test_complete_pieces_are_found_again_and_assembled_in_order(tmp_path):
    written_pieces(tmp_path, [2, 0, 1])
    again = Pieces(str(tmp_path / "out.jsonl"), JOB)
    again.open(restart=False)

    assert again.complete(3) == [0, 1, 2]
    assert again.assemble(3, str(tmp_path / "clue.json")) == [str(tmp_path / "out.jsonl"), str(tmp_path / "clue.json")]
    assert (tmp_path / "out.jsonl").read_text() == "".join(lines_of(0) + lines_of(1) + lines_of(2))
    assert read_jsonl(tmp_path / "clue.json") == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert sorted(os.listdir(tmp_path)) == ["clue.json", "out.jsonl"], "the pieces go once OUTPUT is whole"


@pytest.mark.parametrize("damage", ["a truncated piece", "a piece without its record", "a changed clue file",
                                    "a record that is not JSON"])
def test_a_damaged_or_partial_piece_is_not_complete_and_is_cleared(tmp_path, damage):
    store = written_pieces(tmp_path, [0, 1, 2])
    piece = os.path.join(store.folder, "piece-000001")
    if damage == "a truncated piece":
        with open(f"{piece}.jsonl", "r+b") as f:
            f.truncate(os.path.getsize(f"{piece}.jsonl") - 1)
    elif damage == "a piece without its record":
        os.remove(f"{piece}.done")
    elif damage == "a changed clue file":
        with open(f"{piece}.clue.jsonl", "w") as f:
            f.write('{"id": 7}\n')
    else:
        with open(f"{piece}.done", "w") as f:
            f.write('{"lines": 3, "sha')

    assert store.complete(3) == [0, 2]
    assert not any(name.startswith("piece-000001") for name in os.listdir(store.folder))


def test_pieces_of_another_prediction_are_refused_naming_the_difference(tmp_path):
    written_pieces(tmp_path, [0])
    before = sorted(os.listdir(parts_folder(str(tmp_path / "out.jsonl"))))

    with pytest.raises(UserError) as refused:
        Pieces(str(tmp_path / "out.jsonl"), {**JOB, "batch_size": 16}).open(restart=False)

    assert str(refused.value) == (f"{tmp_path}/out.jsonl.parts holds the pieces of another prediction (batch_size: 8 "
                                  "there, 16 now); pass --restart to discard them, or write to another --output")
    assert sorted(os.listdir(parts_folder(str(tmp_path / "out.jsonl")))) == before, "nothing touched"


def test_another_models_pieces_are_named_by_short_fingerprints(tmp_path):
    written_pieces(tmp_path, [0])

    with pytest.raises(UserError, match=r"\(model: bbbbbbbbbbbb\.\.\. there, cccccccccccc\.\.\. now\)"):
        Pieces(str(tmp_path / "out.jsonl"), {**JOB, "model": "c" * 64}).open(restart=False)


def test_restart_discards_the_pieces_of_another_prediction(tmp_path):
    written_pieces(tmp_path, [0, 1])
    store = Pieces(str(tmp_path / "out.jsonl"), {**JOB, "piece_size": 5})
    store.open(restart=True)

    assert store.complete(3) == []
    with open(os.path.join(store.folder, "job.json"), encoding="utf-8") as f:
        assert json.load(f)["piece_size"] == 5


def test_after_a_failure_an_empty_parts_folder_goes_and_one_with_complete_pieces_stays(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    empty, kept = written_pieces(tmp_path / "a", []), written_pieces(tmp_path / "b", [0])

    empty.remove_if_empty()
    kept.remove_if_empty()

    assert not os.path.exists(empty.folder)
    assert os.listdir(kept.folder) and os.path.exists(os.path.join(kept.folder, "piece-000000.done"))


def test_members_sharing_a_tokenizer_tokenise_a_piece_once_and_get_the_same_batches(tiny_model, tmp_path):
    """An ensemble's members (the folds of a k-fold) usually share a tokenizer: their batches are made once."""
    from transformers import AutoTokenizer

    from afqmc_dist.inference.engine import PairEncoder, PieceReader

    path = write_jsonl(tmp_path / "in.jsonl", unlabelled(50))
    index = scan(str(path), PairSchema(), require_label=False, piece_size=20)
    same = [PairEncoder(AutoTokenizer.from_pretrained(tiny_model), 64, None, token_types=True) for _ in range(2)]
    shorter = PairEncoder(AutoTokenizer.from_pretrained(tiny_model), 16, None, token_types=True)
    prepared = PieceReader(index, PairSchema(), False, [1], [*same, shorter], batch_size=8)[0]
    assert prepared.batches[0] is prepared.batches[1] and prepared.batches[2] is not prepared.batches[0]
    assert max(b["input_ids"].shape[1] for b in prepared.batches[2]) <= 16 < max(
        b["input_ids"].shape[1] for b in prepared.batches[0])
