"""An exported folder as a model the tool's prediction code can call, run by ONNX Runtime.

    from afqmc_dist.export.runtime import is_exported, load_exported
    if is_exported(folder):
        model, tokenizer = load_exported(folder, prefer_cuda=True)
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits   # torch [B, num_labels]

The model object stands where the torch model stands in evaluation.predict: called with torch LongTensors (the
segment ids optional, and dropped for a graph that takes none), it returns an object with `.logits`, a float32
torch tensor on the device of `input_ids`; `.config` is the trained model's config (id2label: the labels);
`.eval()`, `.to(device)` and `.train(False)` return it unchanged (the graph has no training mode, and ONNX
Runtime, not torch, decides where it runs). ONNX Runtime runs on the CPU, or with CUDAExecutionProvider where
`prefer_cuda` and onnxruntime-gpu provides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError
from . import MODEL_FILE, REPORT
from .folder import is_exported

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def import_onnxruntime():
    """onnxruntime, or one line saying how to install it (it is optional, like the trackers)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running an exported model needs onnxruntime, which is not installed: "
                        "pip install 'afqmc-dist[export]'") from None
    return onnxruntime


@dataclass
class Output:
    """What the caller reads of a forward pass, as of a transformers model output."""

    logits: torch.Tensor


class ExportedClassifier:
    """An ONNX Runtime session behind the calling convention of the trained torch model (see the module doc)."""

    def __init__(self, session, config):
        self.session, self.config = session, config
        self.input_names = [graph_input.name for graph_input in session.get_inputs()]
        self.providers = session.get_providers()

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, **_ignored) -> Output:
        # **_ignored: labels and the like, which a classifier's forward also accepts; the caller computes the loss
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if attention_mask is None:
            given["attention_mask"] = torch.ones_like(input_ids)
        if token_type_ids is None:
            given["token_type_ids"] = torch.zeros_like(input_ids)
        feed = {name: given[name].detach().to("cpu", torch.int64).numpy() for name in self.input_names}
        (logits,) = self.session.run(["logits"], feed)
        return Output(torch.from_numpy(logits).float().to(input_ids.device))

    forward = __call__

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self


def session_options(onnxruntime):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ONNX Runtime's notes on graph rewrites are not for the user
    return options


def make_session(model_path: str, prefer_cuda: bool):
    """An ONNX Runtime session on `model_path`: CUDA first where asked for and available, the CPU otherwise."""
    from ..loading import reason

    onnxruntime = import_onnxruntime()
    providers = [CUDA, CPU] if prefer_cuda and CUDA in onnxruntime.get_available_providers() else [CPU]
    try:
        return onnxruntime.InferenceSession(model_path, session_options(onnxruntime), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types (Fail, InvalidGraph, ...)
        raise UserError(f"{model_path}: ONNX Runtime cannot load it ({reason(e, 200)})") from None


def load_exported(folder: str, prefer_cuda: bool):
    """(model, tokenizer) of an exported folder (see the module doc); UserError if it is not one or is damaged."""
    from transformers import AutoConfig, AutoTokenizer

    from ..loading import LOAD_ERRORS, reason

    if not is_exported(folder):
        raise UserError(f"{folder}: not an exported model (no {MODEL_FILE} and {REPORT}); "
                        "write one with python -m afqmc_dist.export")
    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except LOAD_ERRORS as e:
        raise UserError(f"{folder}: cannot load the exported model's config or tokenizer ({reason(e, 200)})") from None
    model = ExportedClassifier(make_session(os.path.join(folder, MODEL_FILE), prefer_cuda), config)
    return model, tokenizer
