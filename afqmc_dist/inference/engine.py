"""A model run over a checked file piece by piece, on every process at once, holding one piece at a time.

The pieces to compute are dealt out in rounds: in round r, process p takes the (r x processes + p)-th of them.
It reads its piece from the file (scan.py knows where it starts), sorts the pairs by length (so that a batch holds
pairs of one length and pads little) and tokenises them in one call, in a DataLoader (in its workers with
--dataloader_num_workers, a piece ahead of the model); then it runs the whole model (no engine: inference needs
none, see evaluation.prepare_for_inference) under the run's precision, and puts the results back in input order.
An ensemble (ensemble.py) runs each of its models over the piece in turn and averages their probabilities. The
round's results are gathered to every process (a collective: every process takes part in every round, with an
empty piece when there is none left for it); the main process writes them. Memory: one piece per process, and one
round of results: it does not grow with the file.

A piece's results depend only on its pairs and the model (its batches are made from the piece alone), so the same
file gives the same bytes on one process or eight, in one go or resumed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain

import torch
from accelerate.utils import gather_object
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..evaluation import inference_autocast
from ..pairs import PairExample, PairSchema
from .scan import InputIndex, read_piece


@dataclass
class PieceResult:
    """One piece's results, in input order: OUTPUT's lines and the CLUE file's (predictions), or the class ids,
    labels and summed loss (a labelled file, for metrics)."""

    piece: int
    count: int
    lines: list[str] | None = None
    clue: list[str] | None = None
    pred_ids: list[int] | None = None
    labels: list[int] | None = None
    loss_sum: float = 0.0


def prediction_record(example: PairExample, pred_id: int, prob: float, label_list: list[str]) -> dict:
    """One line of OUTPUT (predictions.jsonl): the input line's fields, the predicted label and its probability."""
    return {**example.raw, "pred_label": label_list[pred_id], "pred_prob": round(prob, 6)}


def clue_record(example: PairExample, pred_id: int, label_list: list[str], id_key: str) -> dict:
    """One line of CLUE's submission file (TASK_predict.json)."""
    return {"id": example.raw[id_key], "label": label_list[pred_id]}


class PairEncoder:
    """Tokenise the pairs of a piece in one call of the fast tokenizer (its Rust threads, no padding), then cut
    them into padded batches: input_ids, attention_mask, and token_type_ids for a model that takes them.

    One call per piece rather than one per batch: per batch, the tokenizer's padding and its conversion to tensors
    (in Python) cost as much as a small model's forward pass."""

    def __init__(self, tokenizer, max_length: int, pad_to_multiple_of: int | None, token_types: bool):
        self.tokenizer, self.max_length, self.token_types = tokenizer, max_length, token_types
        # Rounding up may not take a batch beyond max_length (the model's positions): only a multiple that divides it.
        fits = pad_to_multiple_of and max_length % pad_to_multiple_of == 0
        self.pad_to_multiple_of = pad_to_multiple_of if fits else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        # Encoders with the same key make the same batches: an ensemble's members that share a tokenizer (the
        # folds of a k-fold) tokenise each piece once.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.key = (backend.to_str() if backend is not None else id(tokenizer), max_length, self.pad_to_multiple_of,
                    token_types, self.pad_id, self.left)

    def batches(self, examples: list[PairExample], batch_size: int) -> list[dict[str, torch.Tensor]]:
        """`examples` tokenised, in batches of `batch_size` in their order, each padded to its longest pair."""
        encoded = self.tokenizer([e.sentence1 for e in examples], [e.sentence2 for e in examples], truncation=True,
                                 max_length=self.max_length, return_attention_mask=False,
                                 return_token_type_ids=self.token_types)
        ids, types = encoded["input_ids"], encoded.get("token_type_ids") if self.token_types else None
        return [self.pad(ids[i:i + batch_size], types[i:i + batch_size] if types is not None else None)
                for i in range(0, len(ids), batch_size)]

    def pad(self, ids: list[list[int]], types: list[list[int]] | None) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(row) for row in ids])
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        columns = torch.arange(width)
        mask = columns >= (width - lengths)[:, None] if self.left else columns < lengths[:, None]
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        input_ids[mask] = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask.long()}
        if types is not None:
            batch["token_type_ids"] = torch.zeros_like(input_ids)
            batch["token_type_ids"][mask] = torch.tensor(list(chain.from_iterable(types)), dtype=torch.long)
        return batch


@dataclass
class Member:
    """One model of the run (an ensemble has several): the model, whole on this process's device in eval mode,
    and the encoder that tokenises pairs its way."""

    model: object
    encoder: PairEncoder


@dataclass
class PreparedPiece:
    """A piece read and tokenised: its pairs in input order, the order its batches take them in (longest first),
    and each member's batches."""

    piece: int
    examples: list[PairExample]
    order: torch.Tensor
    batches: list[list[dict[str, torch.Tensor]]]


class PieceReader(Dataset):
    """Piece `pieces[i]` read from the file, sorted and tokenised for each member: the DataLoader's item, made in
    its worker processes with --dataloader_num_workers (the next piece is then ready when the model is done with
    this one)."""

    def __init__(self, index: InputIndex, schema: PairSchema, require_label: bool, pieces: list[int],
                 encoders: list[PairEncoder], batch_size: int):
        self.index, self.schema, self.require_label, self.pieces = index, schema, require_label, pieces
        self.encoders, self.batch_size = encoders, batch_size

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> PreparedPiece:
        examples = read_piece(self.index, self.pieces[i], self.schema, self.require_label)
        # Longest first (characters stand for tokens): batches of like lengths, and the memory peak at once.
        order = sorted(range(len(examples)), key=lambda i: -(len(examples[i].sentence1) + len(examples[i].sentence2)))
        ordered = [examples[i] for i in order]
        made = {}
        for encoder in self.encoders:
            if encoder.key not in made:
                made[encoder.key] = encoder.batches(ordered, self.batch_size)
        return PreparedPiece(self.pieces[i], examples, torch.tensor(order), [made[e.key] for e in self.encoders])


class PieceRunner:
    """Runs the `members` (one model, or an ensemble whose probabilities are averaged) over the pieces of `index`."""

    def __init__(self, members: list[Member], accelerator, index: InputIndex, schema: PairSchema,
                 require_label: bool, *, batch_size: int, num_workers: int = 0, label_list: list[str] | None = None):
        self.members, self.accelerator, self.index = members, accelerator, index
        self.schema, self.require_label, self.label_list = schema, require_label, label_list
        self.batch_size, self.num_workers = batch_size, num_workers

    @classmethod
    def of(cls, models: list, tokenizers: list, accelerator, index: InputIndex, schema: PairSchema,
           require_label: bool, cfg, batch_size: int, label_list: list[str]) -> PieceRunner:
        """A runner for trained models (prepared for inference) with the run's settings (`cfg`: max length,
        DataLoader workers, padding multiple)."""
        from ..architectures import takes_token_types
        from ..data import pad_multiple

        members = [Member(model, PairEncoder(tokenizer, cfg.max_seq_length, pad_multiple(cfg, accelerator),
                                             takes_token_types(model)))
                   for model, tokenizer in zip(models, tokenizers, strict=True)]
        return cls(members, accelerator, index, schema, require_label, batch_size=batch_size,
                   num_workers=cfg.dataloader_num_workers, label_list=label_list)

    def rounds(self, todo: list[int]) -> Iterator[list[PieceResult]]:
        """The results of the pieces `todo`, a round at a time, on every process (a collective: call on every
        rank). Each round's list is in the order of `todo`."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        # This process's pieces: in round r, todo[r x world + rank].
        reader = PieceReader(self.index, self.schema, self.require_label, todo[rank::world],
                             [member.encoder for member in self.members], self.batch_size)
        prepared = iter(DataLoader(reader, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                   collate_fn=_as_is))
        for _ in range(0, len(todo), world):
            piece = next(prepared, None)
            result = self.run(piece) if piece is not None else None
            gathered = gather_object([result]) if world > 1 else [result]
            yield [r for r in gathered if r is not None]

    def run(self, prepared: PreparedPiece) -> PieceResult:
        examples = prepared.examples
        # log of each member's probabilities [members, pairs, labels]; the ensemble's: the log of their mean.
        log_probs = torch.stack([self.log_probs(member, batches, prepared.order)
                                 for member, batches in zip(self.members, prepared.batches, strict=True)])
        mean = log_probs.logsumexp(dim=0) - math.log(len(self.members))  # exactly log_probs[0] for one member
        loss_sum = 0.0
        if self.require_label:
            labels = torch.tensor([e.label for e in examples])
            loss_sum = F.nll_loss(mean, labels, reduction="sum").item()
        return self.result(prepared.piece, examples, mean.exp(), loss_sum)

    def log_probs(self, member: Member, batches: list[dict], order: torch.Tensor) -> torch.Tensor:
        """The member's log-probabilities of the pairs `[count, labels]`, in piece order (`order[k]`: the piece
        position of the k-th pair of the batches)."""
        # Filled on the device and copied to the host once: a copy per batch would wait for each batch's forward.
        device = self.accelerator.device
        out = torch.empty(len(order), member.model.config.num_labels, device=device)
        order, done = order.to(device), 0
        with torch.inference_mode(), inference_autocast(self.accelerator):
            for batch in batches:
                size = len(batch["input_ids"])
                batch = {k: v.to(device) for k, v in batch.items()}
                out[order[done:done + size]] = member.model(**batch).logits.float().log_softmax(dim=-1)
                done += size
        return out.cpu()

    def result(self, piece: int, examples: list[PairExample], probs: torch.Tensor, loss_sum: float) -> PieceResult:
        pred_ids = probs.argmax(dim=-1).tolist()
        result = PieceResult(piece, len(examples))
        if self.require_label:
            result.pred_ids, result.labels, result.loss_sum = pred_ids, [e.label for e in examples], loss_sum
            return result
        best = probs.max(dim=-1).values.tolist()
        result.lines = [json.dumps(prediction_record(e, p, prob, self.label_list), ensure_ascii=False) + "\n"
                        for e, p, prob in zip(examples, pred_ids, best, strict=True)]
        if self.index.has_ids:
            result.clue = [json.dumps(clue_record(e, p, self.label_list, self.schema.id_key), ensure_ascii=False)
                           + "\n" for e, p in zip(examples, pred_ids, strict=True)]
        return result


def _as_is(item):
    return item
