"""Build a small, randomly initialised model and its tokenizer, saved as a normal Hugging Face folder.

For debugging the whole pipeline offline (no model hub) and for tests/benchmarks. The folder then goes through
the same `from_pretrained` path as `bert-base-chinese`:

    python -m afqmc_dist.tiny_model --output_dir models/tiny-bert-zh                      # vocab from sample data
    python -m afqmc_dist.tiny_model --output_dir models/tiny-bert-zh --vocab_file vocab.txt   # a given vocab
    python -m afqmc_dist.tiny_model --output_dir models/tiny-xlmr --family xlm-roberta       # another family

Every family the tool is tested with (architectures.py) can be built, with a real tokenizer of its kind trained
on the spot by the `tokenizers` library (a second on the sample data) and laid out as its Hub checkpoints are:
the pretraining or masked-LM heads included.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transformers import BertConfig, BertModel, BertTokenizer

from .architectures import FAMILIES
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


# --- every tested family: a tiny random model and a real tokenizer of its kind, trained on the spot -------------

def _texts(paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        for example in iter_pairs(path, PairSchema(), require_label=False):
            texts += [example.sentence1, example.sentence2]
    return texts


def _trained_tokenizer(kind: str, texts: list[str], vocab_size: int):
    """A `tokenizers` Tokenizer of `kind` ("bpe": byte-level BPE, "unigram": SentencePiece-style) trained on
    `texts`, with its special tokens; the pair template is set by the caller."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _pair_template(tokenizer, cls: str, sep: str, double_sep: bool):
    from tokenizers import processors

    middle = f"{sep} {sep}" if double_sep else sep
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {middle} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])


def family_tokenizer(family: str, texts: list[str], vocab: list[str]):
    """A tokenizer of `family`'s kind: WordPiece (BERT, ERNIE, ELECTRA, MegatronBERT) over the character
    vocabulary `vocab`; SentencePiece-style Unigram (XLM-R, DeBERTa-v2) or byte-level BPE (RoBERTa, ModernBERT)
    trained on `texts`. Each with the family's special tokens and pair template."""
    import transformers

    if family in ("bert", "ernie", "electra", "megatron-bert"):
        return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    roberta_style = family in ("roberta", "xlm-roberta")
    tokenizer = _trained_tokenizer("unigram" if family in ("xlm-roberta", "deberta-v2") else "bpe", texts,
                                   vocab_size=800)
    cls, sep, pad, unk, mask = ("<s>", "</s>", "<pad>", "<unk>", "<mask>") if roberta_style else \
        ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")
    _pair_template(tokenizer, cls, sep, double_sep=roberta_style)
    wrapper = {"roberta": "RobertaTokenizer", "xlm-roberta": "XLMRobertaTokenizer",
               "deberta-v2": "DebertaV2Tokenizer", "modernbert": "PreTrainedTokenizerFast"}[family]
    return getattr(transformers, wrapper)(tokenizer_object=tokenizer, cls_token=cls, sep_token=sep, pad_token=pad,
                                          unk_token=unk, mask_token=mask, bos_token=cls, eos_token=sep)


def family_config(family: str, tokenizer, hidden_size: int, num_layers: int, num_heads: int, dropout: float):
    """A small config of `family` sized for `tokenizer` (its special token ids, 512 usable positions)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    common = {"vocab_size": len(tokenizer), "hidden_size": hidden_size, "num_hidden_layers": num_layers,
              "num_attention_heads": num_heads, "intermediate_size": 2 * hidden_size,
              "pad_token_id": tokenizer.pad_token_id}
    drop = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    specific = {
        "bert": {**drop, "max_position_embeddings": 512},
        "ernie": {**drop, "max_position_embeddings": 512},
        "megatron-bert": {**drop, "max_position_embeddings": 512},
        "electra": {**drop, "max_position_embeddings": 512, "embedding_size": hidden_size},
        # As every RoBERTa / XLM-R checkpoint: one token type, positions after the padding index.
        "roberta": {**drop, "max_position_embeddings": 512 + tokenizer.pad_token_id + 1, "type_vocab_size": 1,
                    "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id},
        "xlm-roberta": {**drop, "max_position_embeddings": 512 + tokenizer.pad_token_id + 1, "type_vocab_size": 1,
                        "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id},
        # As the Erlangshen DeBERTa-v2 checkpoints: relative positions, no token types.
        "deberta-v2": {**drop, "max_position_embeddings": 512, "type_vocab_size": 0, "relative_attention": True,
                       "position_biased_input": False, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 64,
                       "position_buckets": 16},
        "modernbert": {"max_position_embeddings": 512, "attention_dropout": dropout, "embedding_dropout": dropout,
                       "mlp_dropout": dropout, "global_attn_every_n_layers": 1, "local_attention": 64,
                       "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
                       "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id},
    }[family]
    return CONFIG_MAPPING[family](**common, **specific)


def build_tiny_model(output_dir: str, family: str = "bert", data_files: list[str] | None = None,
                     hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, dropout: float = 0.1,
                     seed: int = 0) -> str:
    """Save a random-weight model of `family` as its pretraining checkpoint would be laid out (the masked-LM or
    pretraining heads included, as on the Hub), with a tokenizer of its kind built from `data_files`."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

    files = data_files or sorted(str(p) for p in SAMPLE_DIR.glob("*.json"))
    tokenizer = family_tokenizer(family, _texts(files), vocab_from_files(files))
    config = family_config(family, tokenizer, hidden_size, num_layers, num_heads, dropout)
    torch.manual_seed(seed)
    auto = AutoModelForPreTraining if type(config) in AutoModelForPreTraining._model_mapping else AutoModelForMaskedLM
    auto.from_config(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--family", default="bert", help="bert (default), roberta, xlm-roberta, ernie, electra, "
                        "deberta-v2, megatron-bert or modernbert")
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
        if args.family not in FAMILIES:
            raise UserError(f"--family {args.family!r} is not one of {', '.join(FAMILIES)}")
        if args.family == "bert":
            vocab = None if args.vocab_file else vocab_from_files(args.data_files)
            build_tiny_bert(args.output_dir, vocab=vocab, vocab_file=args.vocab_file, hidden_size=args.hidden_size,
                            num_layers=args.num_layers, num_heads=args.num_heads, dropout=args.dropout,
                            seed=args.seed)
        else:
            build_tiny_model(args.output_dir, args.family, args.data_files, hidden_size=args.hidden_size,
                             num_layers=args.num_layers, num_heads=args.num_heads, dropout=args.dropout,
                             seed=args.seed)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tiny {args.family} written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
