"""Models: the standard sequence-classification head, the tutorial's `[CLS]` head, and loading both back.

Everything goes through `from_pretrained`, so a hub name (`bert-base-chinese`, `hfl/chinese-roberta-wwm-ext`)
and a local folder take the same path. Every model returns a `SequenceClassifierOutput` whose `loss` is the mean
cross-entropy when `labels` are given; `logits` are `[B, num_labels]`.
"""

from __future__ import annotations

import json
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

from .errors import UserError


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

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # [B, T, H]
        logits = self.classifier(self.dropout(hidden[:, 0]))  # [B, num_labels]
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _load_error(path: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = "; if it is a BERT checkpoint, pass --model_type bert" if "model_type" in first else ""
    return UserError(f"--model_checkpoint {path}: cannot load ({first}){hint}")


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


def build_model_and_tokenizer(cfg):
    """The model to fine-tune (encoder weights from `cfg.model_checkpoint`, new classifier) and its tokenizer."""
    path = cfg.model_checkpoint
    config = load_config(path, cfg.model_type, cfg.label_list)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        if cfg.head == "cls":
            if config.model_type != "bert":
                raise UserError(f"--head cls needs a BERT checkpoint, {path} is {config.model_type!r} "
                                "(use --head seq, or --model_type bert if it is a BERT)")
            model = BertClsPairClassifier.from_pretrained(path, config=config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    return model, tokenizer


def load_trained_model(path: str):
    """Load a folder written by this tool (OUTPUT_DIR/best), with whichever head it was trained with."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"{path}: no trained model here (missing config.json); run --do_train first")
    with open(config_file, encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    model_cls = BertClsPairClassifier if BertClsPairClassifier.__name__ in architectures \
        else AutoModelForSequenceClassification
    return model_cls.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
