"""Torch -> ONNX: the trained model's logits as an ONNX graph with dynamic batch and sequence axes, and its int8
version.

The exporter is torch.onnx's dynamo exporter (`torch.export` + onnxscript), the one torch 2.9+ maintains; the older
TorchScript exporter is deprecated and only traces. Two traps of exporting a Hugging Face encoder, both avoided:
- the example batch must hold padding: with an all-ones attention mask, transformers takes its "no padding" path
  and the graph would ignore the mask of every later batch (probabilities off by several percent);
- inputs are given by position, in the graph's input order: the names passed to the exporter follow the order of
  the example inputs, so keyword inputs in another order would put the mask under the name of the segment ids.
The graph takes `token_type_ids` only where the model uses them (architectures.takes_token_types): RoBERTa and
XLM-R have a single token type, ModernBERT's forward takes none.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..architectures import max_tokens, takes_token_types
from ..errors import UserError
from ..loading import reason

EXAMPLE_BATCH, EXAMPLE_LENGTH, EXAMPLE_PADDED_FROM = 2, 8, 5
# protobuf's limit for one file: a larger model keeps its weights in a file beside model.onnx (.data)
SINGLE_FILE_LIMIT = 1_800_000_000


def input_names(model) -> list[str]:
    """The graph's inputs, in order: segment ids only for a model that uses them."""
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_token_types(model) else [])


class Logits(nn.Module):
    """The model with positional inputs and the logits as its only output: what the graph computes."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs, strict=True))).logits


def example_inputs(model, tokenizer, names: list[str]) -> tuple[torch.Tensor, ...]:
    """A [2, 8] batch whose second row is padded (see the module docstring). Token values do not matter."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, EXAMPLE_PADDED_FROM:], mask[1, EXAMPLE_PADDED_FROM:] = pad, 0
    types = torch.zeros_like(ids)
    types[:, EXAMPLE_LENGTH // 2:] = 1
    return tuple({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}[name] for name in names)


@contextmanager
def quiet_exporter():
    """The exporter's and quantizer's warnings (torchvision's operators not registered, deprecations inside
    torch.export, axis renames, the quantizer's advice on the root logger) say nothing about this model: the command
    prints its own lines."""
    loggers = [logging.getLogger("torch.onnx"), logging.getLogger()]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model, tokenizer, path: str, where: str) -> list[str]:
    """Write `model`'s logits graph to `path`; return its input names. UserError if the exporter fails."""
    names = input_names(model)
    longest = max_tokens(model.config) or 512
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=longest)
    try:
        with quiet_exporter(), torch.no_grad():
            # One varargs parameter (`*inputs`): its dynamic shapes are one tuple, one entry per input.
            program = torch.onnx.export(Logits(model, names).eval(), example_inputs(model, tokenizer, names),
                                        input_names=names, output_names=["logits"], dynamo=True, verbose=False,
                                        dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),))
    except Exception as e:  # noqa: BLE001 - torch.export and onnxscript raise many types; each is one refusal
        raise UserError(f"{where}: torch.onnx cannot export this {model.config.model_type!r} model "
                        f"({type(e).__name__}: {reason(e, 200)})") from None
    proto = program.model_proto
    # The exporter's intermediate shape annotations can disagree with what ONNX's own shape inference finds
    # (a dimension recorded from the example batch), which makes the quantizer fail: ONNX Runtime needs none.
    del proto.graph.value_info[:]
    save_model(proto, path)
    return names


def save_model(proto, path: str) -> None:
    """`proto` as one file, or with its weights beside it where one file cannot hold them (over 2 GB)."""
    import onnx

    large = proto.ByteSize() > SINGLE_FILE_LIMIT
    onnx.save_model(proto, path, save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{os.path.basename(path)}.data" if large else None)


def quantize_int8(fp32_path: str, int8_path: str) -> None:
    """ONNX Runtime's dynamic quantization: int8 weights of every MatMul/Gemm, activations quantized per batch at
    run time (uint8 x int8, the kernels with VNNI on x86). No calibration data: the check file then measures what
    it costs in accuracy."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = os.path.getsize(fp32_path) > SINGLE_FILE_LIMIT or os.path.exists(f"{fp32_path}.data")
    with quiet_exporter():
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, use_external_data_format=large)
