"""Build a small, randomly initialised BERT and its tokenizer, saved as a normal Hugging Face folder.

For debugging the whole pipeline offline (no model hub) and for tests/benchmarks. The folder then goes through
the same `from_pretrained` path as `bert-base-chinese`:

    python -m afqmc_dist.tiny_model --output_dir models/tiny-bert-zh                      # vocab from sample data
    python -m afqmc_dist.tiny_model --output_dir models/tiny-bert-zh --vocab_file vocab.txt   # a given vocab
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transformers import BertConfig, BertModel, BertTokenizer

from .errors import UserError
from .pairs import PairSchema, iter_pairs

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SAMPLE_DIR = Path(__file__).parent / "sample_data"


def vocab_from_files(paths: list[str], schema: PairSchema | None = None) -> list[str]:
    """A character vocabulary covering every character of the sentences in `paths`.

    BERT's Chinese tokenisation splits CJK text into single characters; other characters also get a `##`
    continuation form so that Latin words and numbers split into known pieces instead of [UNK].
    """
    chars = set()
    for path in paths:
        for example in iter_pairs(path, schema or PairSchema(), require_label=False):
            chars.update(example.sentence1.lower() + example.sentence2.lower())
    chars -= set(" \t\r\n")
    ordered = sorted(chars)
    return SPECIAL_TOKENS + ordered + [f"##{c}" for c in ordered if not _is_cjk(c)]


def _is_cjk(char: str) -> bool:
    return 0x4E00 <= ord(char) <= 0x9FFF or 0x3400 <= ord(char) <= 0x4DBF


def build_tiny_bert(output_dir: str, vocab: list[str] | None = None, vocab_file: str | None = None,
                    hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                    intermediate_size: int | None = None, max_position_embeddings: int = 512,
                    dropout: float = 0.1, seed: int = 0) -> str:
    """Save a random-weight BERT encoder (`BertModel`) and a WordPiece tokenizer to `output_dir`."""
    import torch

    if vocab_file:
        # split("\n"), not splitlines(): bert-base-chinese's vocab has entries holding U+2028, which
        # splitlines() would break in two, shifting every later token id.
        vocab = Path(vocab_file).read_text(encoding="utf-8").rstrip("\n").split("\n")
    # BertTokenizer(vocab=...) takes the token -> id map; `vocab_file=` would silently build a 5-token vocab.
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocab_file", help="WordPiece vocab (e.g. bert-base-chinese's vocab.txt)")
    parser.add_argument("--data_files", nargs="+", default=sorted(str(p) for p in SAMPLE_DIR.glob("*.json")),
                        help="build a character vocab from these JSON-lines files (default: the sample data)")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.vocab_file and not os.path.isfile(args.vocab_file):
            raise UserError(f"--vocab_file {args.vocab_file}: no such file")
        vocab = None if args.vocab_file else vocab_from_files(args.data_files)
        build_tiny_bert(args.output_dir, vocab=vocab, vocab_file=args.vocab_file, hidden_size=args.hidden_size,
                        num_layers=args.num_layers, num_heads=args.num_heads, dropout=args.dropout,
                        seed=args.seed)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tiny BERT written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
