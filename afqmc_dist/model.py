"""Models: the standard sequence-classification head, the tutorial's `[CLS]` head, and loading both back.

Everything goes through `from_pretrained`, so a hub name (`bert-base-chinese`, `hfl/chinese-roberta-wwm-ext`)
and a local folder take the same path. Every model returns a `SequenceClassifierOutput` whose `loss` is the mean
cross-entropy when `labels` are given; `logits` are `[B, num_labels]`.
"""

from __future__ import annotations

import os

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertModel,
    BertPreTrainedModel,
    PretrainedConfig,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .errors import UserError, first_line


class BertClsPairClassifier(BertPreTrainedModel):
    """The tutorial's head: BERT encoder without its pooler, the `[CLS]` vector, dropout, one linear layer.

    Saved with `save_pretrained`; the folder's config names this class in `architectures`, which is how
    `load_trained_model` knows to restore it (with every weight, the classifier included).
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # [B, T, H]
        logits = self.classifier(self.dropout(hidden[:, 0]))  # [B, num_labels]
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _load_error(path: str, e: Exception) -> UserError:
    hint = "; if it is a BERT checkpoint, pass --model_type bert" if "model_type" in first_line(e) else ""
    return UserError(f"--model_checkpoint {path}: cannot load ({first_line(e)}){hint}")


def load_config(path: str, model_type: str | None, label_list: list[str]) -> PretrainedConfig:
    """The checkpoint's config with our label set. `model_type` forces the config class (e.g. "bert")."""
    labels = {"num_labels": len(label_list), "id2label": dict(enumerate(label_list)),
              "label2id": {label: i for i, label in enumerate(label_list)}}
    try:
        if model_type:
            if model_type not in CONFIG_MAPPING:
                raise UserError(f"--model_type {model_type!r} is not a transformers model type (e.g. bert)")
            return CONFIG_MAPPING[model_type].from_pretrained(path, **labels)
        return AutoConfig.from_pretrained(path, **labels)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(path, e) from None


HEAD_WEIGHTS = ("classifier", "score", "pooler")  # parts of a model a pretrained encoder need not have


def check_model_fits(model, tokenizer, max_seq_length: int, where: str) -> None:
    """Refuse a tokenizer/model pair that would silently train on garbage or fail mid-run."""
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise UserError(f"{where}: the tokenizer has only {len(tokenizer)} tokens: the folder lacks its "
                        "tokenizer files (tokenizer.json or vocab.txt)")
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.config.vocab_size} embeddings")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and max_seq_length > positions:
        raise UserError(f"--max_seq_length {max_seq_length} exceeds the {positions} positions of {where}")


def build_model_and_tokenizer(cfg):
    """The model to fine-tune (encoder weights from `cfg.model_checkpoint`, new classifier) and its tokenizer."""
    path = cfg.model_checkpoint
    config = load_config(path, cfg.model_type, cfg.label_list)
    if cfg.head == "cls" and config.model_type != "bert":
        raise UserError(f"--head cls needs a BERT checkpoint, {path} is {config.model_type!r} "
                        "(use --head seq, or --model_type bert if it is a BERT)")
    model_cls = BertClsPairClassifier if cfg.head == "cls" else AutoModelForSequenceClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        model, info = model_cls.from_pretrained(path, config=config, output_loading_info=True)
    except RuntimeError as e:  # a fine-tuned checkpoint whose classifier has another number of labels
        if "mismatched_sizes" not in str(e):
            raise
        raise UserError(f"--model_checkpoint {path} already has a classifier, for another number of labels than "
                        f"the {len(cfg.label_list)} of --label_list: start from the base checkpoint") from None
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    missing = [key for key in info["missing_keys"] if not any(part in key for part in HEAD_WEIGHTS)]
    if missing:
        raise UserError(f"--model_checkpoint {path}: {len(missing)} encoder weights are not in the checkpoint "
                        f"(e.g. {missing[0]}); is --model_type right?")
    check_model_fits(model, tokenizer, cfg.max_seq_length, f"--model_checkpoint {path}")
    return model, tokenizer


def load_trained_config(path: str) -> PretrainedConfig:
    """The config of a folder written by this tool (OUTPUT_DIR/best): its labels and which head it has."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: no trained model here; run --do_train first")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the trained model ({first_line(e)})") from None


def load_trained_model(path: str):
    """Load a folder written by this tool (OUTPUT_DIR/best), with whichever head it was trained with."""
    config = load_trained_config(path)
    model_cls = BertClsPairClassifier if BertClsPairClassifier.__name__ in (config.architectures or []) \
        else AutoModelForSequenceClassification
    try:
        return model_cls.from_pretrained(path, config=config), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the trained model ({first_line(e)})") from None
