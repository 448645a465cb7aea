"""From a trained model to a served one: `python -m afqmc_dist.export` writes an ONNX model checked against the
trained model on the user's own data, and `runtime.load_exported` runs it with ONNX Runtime.

    python -m afqmc_dist.export --model OUTPUT_DIR/best --output_dir EXPORT [--quantize int8]
        [--check_file dev.json] [--max_accuracy_drop 0.005]

EXPORT then holds `model.onnx` (dynamic batch and sequence axes), the model's config.json (labels), its tokenizer
files and `export_report.json`: what the exported model was checked on and how it compares with the trained model
(largest probability difference, label agreement, accuracy of both when the check file has labels, pairs/s of both
on the exporting machine). An fp32 export must agree with the trained model (same labels, probabilities within
1e-4); an int8 export (ONNX Runtime's dynamic quantization) is refused, and nothing written, when it loses more
accuracy on the check file than --max_accuracy_drop allows.

Parts:
    __main__.py   the command: flags and files checked first (before the heavy imports), then steps.py
    steps.py      load the trained model, export, check, quantize and gate, write config, tokenizer and report
    graph.py      torch -> ONNX (torch.onnx's dynamo exporter), int8 dynamic quantization
    check.py      the check file tokenised as the tool does, both models run on it, the comparison and the gate
    runtime.py    is_exported / load_exported: an exported folder as a model the tool's prediction code can call
    folder.py     the output folder: refused when it holds something else, written through a temporary folder

`onnx`, `onnxruntime` and `onnxscript` are optional (`pip install 'afqmc-dist[export]'`): only this package
imports them, and only once a command or `load_exported` needs them; training and prediction never do.
"""

REPORT = "export_report.json"  # written last: its presence marks a complete export
MODEL_FILE = "model.onnx"
