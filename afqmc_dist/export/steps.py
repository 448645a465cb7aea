"""The export, step by step, inside the temporary folder: load and check the trained model, export the graph,
check it against the trained model, quantize and gate, then the config, tokenizer and report beside the model."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from ..architectures import FAMILIES
from ..errors import UserError
from ..files import remove_quietly, write_json
from ..model import check_model_fits, load_trained_config, load_trained_model
from . import MODEL_FILE, REPORT
from .check import (
    FP32_TOLERANCE,
    compare,
    exported_caller,
    read_check_set,
    require_accuracy,
    require_agreement,
    run_model,
    torch_caller,
)
from .graph import export_onnx, quantize_int8
from .runtime import CPU, ExportedClassifier, make_session

FP32_SCRATCH = "model.fp32.onnx"  # the fp32 graph an int8 export is quantized from; not kept


def load_checked_model(path: str, max_seq_length: int):
    """The trained model and tokenizer, refused with one line when it cannot be exported: a base checkpoint (no
    trained head: load_trained_model) or an architecture outside the families the tool is tested with."""
    config = load_trained_config(path)
    if config.model_type not in FAMILIES:
        raise UserError(f"--model {path} is a {config.model_type!r} model: exporting supports the encoder families "
                        f"the tool is tested with ({', '.join(FAMILIES)})")
    model, tokenizer = load_trained_model(path)
    check_model_fits(model, tokenizer, max_seq_length, path)
    return model.float().eval(), tokenizer


def check_graph(path: str, config, trained, check) -> dict:
    """The exported model at `path`, run by ONNX Runtime on the CPU as the predict command will, against the trained
    model's probabilities on the check set."""
    exported = ExportedClassifier(make_session(path, prefer_cuda=False), config)
    return compare(trained, run_model(exported_caller(exported), check), check)


def export_checked(args, plan, folder: str) -> dict:
    """Write the checked export into `folder` (the temporary folder); return its report."""
    model, tokenizer = load_checked_model(args.model, plan.max_seq_length)
    labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
    schema = dataclasses.replace(plan.schema, label_list=tuple(labels))
    check = read_check_set(plan.check_file, schema, tokenizer, plan.max_seq_length, args.batch_size)
    model_path = os.path.join(folder, MODEL_FILE)
    fp32_path = os.path.join(folder, FP32_SCRATCH) if args.quantize else model_path
    names = export_onnx(model, tokenizer, fp32_path, f"--model {args.model}")
    trained = run_model(torch_caller(model, names), check)
    fp32_check = check_graph(fp32_path, model.config, trained, check)
    require_agreement(fp32_check, f"--model {args.model}")
    report = {"precision": "fp32", "check": fp32_check}
    if args.quantize:
        quantize_int8(fp32_path, model_path)
        for name in (FP32_SCRATCH, f"{FP32_SCRATCH}.data"):
            remove_quietly(os.path.join(folder, name))
        int8_check = check_graph(model_path, model.config, trained, check)
        require_accuracy(int8_check, args.max_accuracy_drop)
        report = {"precision": "int8", "check": int8_check, "fp32_check": fp32_check}
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    report.update(describe(args, plan, model, names, labels), opset=opset_of(model_path))
    write_json(os.path.join(folder, REPORT), report)  # last: its presence marks a complete export
    return report


def opset_of(path: str) -> int | None:
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe(args, plan, model, names: list[str], labels: list[str]) -> dict:
    """The rest of the report: where the model came from, what the graph takes, the gate, the versions, the
    machine the pairs/s were measured on."""
    return {
        "model_file": MODEL_FILE, "source_model": os.path.abspath(args.model),
        "model_type": model.config.model_type, "architecture": type(model).__name__, "labels": labels,
        "inputs": names, "outputs": ["logits"], "max_seq_length": plan.max_seq_length,
        "quantization": "onnxruntime dynamic (int8 weights, uint8 activations)" if args.quantize else None,
        "max_accuracy_drop": args.max_accuracy_drop if args.quantize else None, "fp32_tolerance": FP32_TOLERANCE,
        "exporter": "torch.onnx (dynamo)", "check_batch_size": args.batch_size,
        "measured_on": {"provider": CPU, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "machine": platform.machine(), "load_1min": _load()},
        "versions": {name: _version(name) for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
