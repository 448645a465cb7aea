"""The encoder families the tool is tested with, and what each needs: its inputs, its position limit, its heads.

    family         example checkpoints (Hub names)                               tokenizer
    bert           bert-base-chinese, hfl/chinese-roberta-wwm-ext, hfl/chinese-macbert-base   WordPiece
    roberta        roberta-base                                                   byte-level BPE
    xlm-roberta    xlm-roberta-base                                               SentencePiece (Unigram)
    ernie          nghuyong/ernie-3.0-base-zh                                     WordPiece
    electra        hfl/chinese-electra-180g-base-discriminator                    WordPiece
    deberta-v2     IDEA-CCNL/Erlangshen-DeBERTa-v2-97M-Chinese                    SentencePiece (Unigram)
    megatron-bert  IDEA-CCNL/Erlangshen-MegatronBert-1.3B                         WordPiece
    modernbert     answerdotai/ModernBERT-base                                    byte-level BPE

What differs between them, and how the tool follows each model's own config rather than a table:
- segment ids (`token_type_ids`) go to a model only if its forward takes them and its config has two or more
  token types (RoBERTa and XLM-R checkpoints have one, DeBERTa-v2 none, ModernBERT's forward takes none);
- the position limit: RoBERTa-family positions start after the padding index, so 514 positions hold 512 tokens;
  a --max_seq_length above what the model holds is refused with the limit named;
- the classification head: every weight outside the encoder (the model's `base_model_prefix` part) belongs to
  the head, new when fine-tuning a base checkpoint (ModernBERT's dense + norm head included, loaded from the
  masked-LM head when the checkpoint has one); the checkpoint's pretraining heads, named per family, are unused;
- attention: FlashAttention 2 on a GPU where it is installed and supported, else PyTorch's SDPA where the
  model supports it, else the model's own ("eager"); the choice is in run_config.json.
A checkpoint of another architecture is refused before any work, unless --allow_untested_architecture.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    examples: tuple[str, ...]
    tokenizer: str
    positions_after_padding: bool = False  # RoBERTa family: position ids start at padding index + 1
    # Weight-name prefixes of the pretraining heads its checkpoints are saved with (masked-LM, next-sentence,
    # replaced-token detection): not used when fine-tuning. Any other unused weight is shown as a warning.
    pretraining_heads: tuple[str, ...] = ("cls.",)


FAMILIES = {f.model_type: f for f in (
    Family("bert", ("bert-base-chinese", "hfl/chinese-roberta-wwm-ext", "hfl/chinese-macbert-base"), "WordPiece"),
    Family("roberta", ("roberta-base",), "byte-level BPE", positions_after_padding=True,
           pretraining_heads=("lm_head.",)),
    Family("xlm-roberta", ("xlm-roberta-base",), "SentencePiece (Unigram)", positions_after_padding=True,
           pretraining_heads=("lm_head.",)),
    Family("ernie", ("nghuyong/ernie-3.0-base-zh",), "WordPiece"),
    Family("electra", ("hfl/chinese-electra-180g-base-discriminator",), "WordPiece",
           pretraining_heads=("discriminator_predictions.", "generator_predictions.", "generator_lm_head.")),
    Family("deberta-v2", ("IDEA-CCNL/Erlangshen-DeBERTa-v2-97M-Chinese",), "SentencePiece (Unigram)",
           pretraining_heads=("cls.", "lm_predictions.", "mask_predictions.")),
    Family("megatron-bert", ("IDEA-CCNL/Erlangshen-MegatronBert-1.3B",), "WordPiece"),
    # Its masked-LM head's dense + norm ("head.") is the standard classification head's first layer (loaded, so
    # not unused); the tutorial's [CLS] head leaves it unused, with the decoder.
    Family("modernbert", ("answerdotai/ModernBERT-base",), "byte-level BPE", pretraining_heads=("decoder.", "head.")),
)}


def pretraining_heads(model_type: str) -> tuple[str, ...]:
    """The pretraining-head prefixes of a family; of every family for an untested architecture."""
    if model_type in FAMILIES:
        return FAMILIES[model_type].pretraining_heads
    return tuple(sorted({prefix for family in FAMILIES.values() for prefix in family.pretraining_heads}))


def check_family(config, where: str, allow_untested: bool) -> Family | None:
    """The family of `config`; UserError for an untested architecture unless `allow_untested` (then None)."""
    family = FAMILIES.get(config.model_type)
    if family is None and not allow_untested:
        raise UserError(f"{where} is a {config.model_type!r} model, an architecture this tool has not been tested "
                        f"with (tested: {', '.join(FAMILIES)}); pass --allow_untested_architecture to try it anyway")
    return family


def max_tokens(config) -> int | None:
    """The longest pair (in tokens, special tokens included) the model's position embeddings hold, or None."""
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    family = FAMILIES.get(config.model_type)
    if family is not None and family.positions_after_padding:
        return positions - (config.pad_token_id or 0) - 1
    return positions


def takes_token_types(model) -> bool:
    """Whether `model` gets segment ids: its forward takes them and its config has two or more token types."""
    forward = inspect.signature(type(model).forward).parameters
    return "token_type_ids" in forward and (getattr(model.config, "type_vocab_size", 0) or 0) >= 2


def attention_implementation(model_cls, on_gpu: bool) -> str:
    """The attention `model_cls` runs with here (see the module docstring)."""
    if on_gpu and getattr(model_cls, "_supports_flash_attn", False) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
