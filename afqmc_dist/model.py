"""Models: the standard sequence-classification head, the tutorial's `[CLS]` head, and loading both back.

Everything goes through `from_pretrained`, so a hub name (`bert-base-chinese`, `hfl/chinese-roberta-wwm-ext`)
and a local folder take the same path (a local folder is checked first: loading.py). Every model returns a
`SequenceClassifierOutput` whose `loss` is the mean cross-entropy when `labels` are given; `logits` are
`[B, num_labels]`.
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

from .errors import UserError
from .loading import LOAD_ERRORS, check_folder, describe_loading, is_rank_zero, load_weights, reason


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


def _load_error(where: str, e: Exception, hub: bool = False) -> UserError:
    why = reason(e)
    if hub:
        return UserError(f"{where}: no such folder, and no model of that name could be loaded from the hub ({why})")
    hint = "; if it is a BERT checkpoint, pass --model_type bert" if "model_type" in why else ""
    return UserError(f"{where}: cannot load ({why}){hint}")


def load_config(path: str, model_type: str | None, label_list: list[str]) -> PretrainedConfig:
    """The checkpoint's config with our label set. `model_type` forces the config class (e.g. "bert")."""
    where = f"--model_checkpoint {path}"
    if model_type and model_type not in CONFIG_MAPPING:
        raise UserError(f"--model_type {model_type!r} is not a transformers model type (e.g. bert)")
    local = check_folder(path, where, hub_allowed=True)
    # num_labels follows from id2label; passing it too makes transformers warn when the checkpoint's own
    # id2label (a fine-tuned one's) has another length.
    labels = {"id2label": dict(enumerate(label_list)), "label2id": {label: i for i, label in enumerate(label_list)}}
    try:
        if model_type:
            return CONFIG_MAPPING[model_type].from_pretrained(path, **labels)
        return AutoConfig.from_pretrained(path, **labels)
    except LOAD_ERRORS as e:
        raise _load_error(where, e, hub=not local) from None


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
    """The model to fine-tune (encoder weights from `cfg.model_checkpoint`, new classifier) and its tokenizer.

    Prints one line on rank 0 about the classifier head (new, or loaded from an already fine-tuned checkpoint),
    and warns of checkpoint weights the model does not use (see loading.describe_loading).
    """
    path = cfg.model_checkpoint
    where = f"--model_checkpoint {path}"
    config = load_config(path, cfg.model_type, cfg.label_list)
    if cfg.head == "cls" and config.model_type != "bert":
        raise UserError(f"--head cls needs a BERT checkpoint, {path} is {config.model_type!r} "
                        "(use --head seq, or --model_type bert if it is a BERT)")
    model_cls = BertClsPairClassifier if cfg.head == "cls" else AutoModelForSequenceClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        model, info = load_weights(model_cls, path, config)
    except LOAD_ERRORS as e:
        raise _load_error(where, e) from None
    note = describe_loading(info, where, trained=False)
    check_model_fits(model, tokenizer, cfg.max_seq_length, where)
    if note and is_rank_zero():
        print(note, flush=True)
    return model, tokenizer


def load_trained_config(path: str) -> PretrainedConfig:
    """The config of a folder written by this tool (OUTPUT_DIR/best): its labels and which head it has.

    Also checks that the folder's weights file is whole (its header, not its tensors), so that a damaged model
    is refused before a run writes anything.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: no trained model here; run --do_train first")
    check_folder(path, f"{path}: cannot load the trained model", hub_allowed=False)
    try:
        return AutoConfig.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise UserError(f"{path}: cannot load the trained model ({reason(e)})") from None


def load_trained_model(path: str):
    """Load a folder written by this tool (OUTPUT_DIR/best), with whichever head it was trained with.

    Every weight must be in the folder: a folder without a trained classifier (a base checkpoint such as
    `tiny_model` writes) is refused rather than predicting with a random head.
    """
    config = load_trained_config(path)
    model_cls = BertClsPairClassifier if BertClsPairClassifier.__name__ in (config.architectures or []) \
        else AutoModelForSequenceClassification
    try:
        model, info = load_weights(model_cls, path, config)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise UserError(f"{path}: cannot load the trained model ({reason(e)})") from None
    describe_loading(info, path, trained=True)
    return model, tokenizer
