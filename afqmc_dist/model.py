"""Models: the standard sequence-classification head, the tutorial's `[CLS]` head, and loading both back.

Everything goes through `from_pretrained`, so a hub name (`bert-base-chinese`, `hfl/chinese-roberta-wwm-ext`)
and a local folder take the same path (a local folder is checked first: loading.py). Every model returns a
`SequenceClassifierOutput` whose `loss` is the mean cross-entropy when `labels` are given; `logits` are
`[B, num_labels]`. Which encoder families are tested, and what differs between them: architectures.py.

OUTPUT_DIR/best with the `[CLS]` head (class NAMEClsPairClassifier, e.g. RobertaClsPairClassifier) loads back with
the tool, outside it too (the project installed):

    from afqmc_dist.model import load_trained_model
    model, tokenizer = load_trained_model("OUTPUT_DIR/best")
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, MODEL_MAPPING

from .architectures import attention_implementation, check_family, max_tokens, pretraining_heads
from .errors import UserError
from .loading import LOAD_ERRORS, check_folder, describe_loading, is_rank_zero, load_weights, reason


class ClsPairHead:
    """The tutorial's head on any encoder: the encoder without its pooler, the first token's vector (`[CLS]`, or
    `<s>`), dropout, one linear layer. Mixed into the encoder family's PreTrainedModel class by `cls_head_class`,
    so that the encoder keeps its name (`base_model_prefix`: its weights load from the family's checkpoints) and
    its weight initialisation. Saved with `save_pretrained`; the folder's config names the class in
    `architectures`, which is how `load_trained_model` knows to restore it (with every weight, the classifier
    included)."""

    encoder_class: type  # set by cls_head_class

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        pooling = "add_pooling_layer" in inspect.signature(self.encoder_class.__init__).parameters
        encoder = self.encoder_class(config, add_pooling_layer=False) if pooling else self.encoder_class(config)
        setattr(self, self.base_model_prefix, encoder)
        dropout = next((p for p in (getattr(config, "classifier_dropout", None),
                                    getattr(config, "hidden_dropout_prob", None)) if p is not None), 0.1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = getattr(self, self.base_model_prefix)(**inputs).last_hidden_state  # [B, T, H]
        logits = self.classifier(self.dropout(hidden[:, 0]))  # [B, num_labels]
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


CLS_HEAD = "ClsPairClassifier"
_cls_classes: dict[type, type] = {}


def cls_head_class(config) -> type:
    """The `[CLS]` head's class for `config`'s encoder family (made once per family): e.g. BertClsPairClassifier,
    a ClsPairHead and a BertPreTrainedModel."""
    encoder_class = MODEL_MAPPING[type(config)]
    if encoder_class not in _cls_classes:
        pretrained = next(c for c in encoder_class.__mro__ if c.__name__.endswith("PreTrainedModel"))
        name = pretrained.__name__.removesuffix("PreTrainedModel") + CLS_HEAD
        _cls_classes[encoder_class] = type(name, (ClsPairHead, pretrained), {"encoder_class": encoder_class,
                                                                              "__module__": __name__})
    return _cls_classes[encoder_class]


def head_class(config, head: str) -> type:
    """The class of a model with head `head` ("seq", "cls") for `config`."""
    return cls_head_class(config) if head == "cls" else AutoModelForSequenceClassification


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
    tokens = max_tokens(model.config)
    if tokens and max_seq_length > tokens:
        positions = model.config.max_position_embeddings
        held = f"{positions} positions, which hold {tokens} tokens" if positions != tokens else f"{positions} positions"
        raise UserError(f"--max_seq_length {max_seq_length} exceeds what {where} holds: {held}; pass "
                        f"--max_seq_length {tokens} or less")


def build_model_and_tokenizer(cfg):
    """The model to fine-tune (encoder weights from `cfg.model_checkpoint`, new classifier) and its tokenizer.

    An architecture the tool has not been tested with is refused before its weights are read, unless
    --allow_untested_architecture. Prints one line on rank 0 about the classifier head (new, or loaded from an
    already fine-tuned checkpoint), and warns of checkpoint weights the model does not use
    (loading.describe_loading). The attention implementation is chosen for this machine (architectures.py) and is
    the model's `config._attn_implementation` (run_config.json records it).
    """
    path = cfg.model_checkpoint
    where = f"--model_checkpoint {path}"
    config = load_config(path, cfg.model_type, cfg.label_list)
    check_family(config, where, cfg.allow_untested_architecture)
    model_cls = head_class(config, cfg.head)
    # The Auto class's concrete class for this config: its attention support decides the implementation.
    resolved = model_cls if cfg.head == "cls" else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    attention = attention_implementation(resolved, on_gpu=torch.cuda.is_available() and not cfg.cpu)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        model, info = load_weights(model_cls, path, config, attn_implementation=attention)
    except LOAD_ERRORS as e:
        raise _load_error(where, e) from None
    note = describe_loading(info, where, trained=False, encoder=model.base_model_prefix,
                            pretraining_heads=pretraining_heads(config.model_type))
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
    cls_head = any(name.endswith(CLS_HEAD) for name in config.architectures or [])
    try:
        model, info = load_weights(head_class(config, "cls" if cls_head else "seq"), path, config)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise UserError(f"{path}: cannot load the trained model ({reason(e)})") from None
    describe_loading(info, path, trained=True, encoder=model.base_model_prefix)
    return model, tokenizer
