"""`python -m afqmc_dist.export`: real exports of tiny trained models, run by the real ONNX Runtime and compared
with the torch models they come from; bad input refused with one line, exit 2, nothing written.

The trained models: the `trained_run` fixture (2 labels, the sequence-classification head), a 3-label run with
the `[CLS]` head trained here, and a tiny RoBERTa (byte-level BPE, one token type) built with transformers.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
from conftest import (
    FILLER,
    PLANTED,
    ROOT,
    SAMPLE_DIR,
    last_error_line,
    read_jsonl,
    requires,
    synthetic_pairs,
    write_jsonl,
)

from afqmc_dist.export import MODEL_FILE, REPORT
from afqmc_dist.export.__main__ import main

needs_onnx = requires("onnx", "onnxruntime", "onnxscript")


def export(*args) -> int:
    return main([str(a) for a in args])


def report_of(folder) -> dict:
    return json.loads((folder / REPORT).read_text(encoding="utf-8"))


def assert_agrees(check: dict, pairs: int) -> None:
    """What an fp32 export promises on its check file: the same labels and probabilities within 1e-4."""
    assert check["pairs"] == pairs
    assert check["labels_changed"] == 0 and check["label_agreement"] == 1.0
    assert check["max_prob_diff"] <= 1e-4
    assert check["accuracy_exported"] == check["accuracy_trained"] and check["accuracy_drop"] == 0
    assert check["pairs_per_second_trained"] > 0 and check["pairs_per_second_exported"] > 0


def assert_refused(capsys, output_dir, *words: str) -> str:
    """One `error:` line naming what is wrong, and nothing written: no output folder, no temporary beside it."""
    line = last_error_line(capsys.readouterr().err)
    for word in words:
        assert word in line, line
    assert not output_dir.exists()
    if output_dir.parent.exists():
        assert not [p for p in output_dir.parent.iterdir() if p.name.startswith(f".{output_dir.name}.tmp")]
    return line


def lines(path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@pytest.fixture(scope="module")
def fp32_export(trained_run, tmp_path_factory):
    """The trained run's best/ exported in fp32, checked on the run's dev file (the default check file)."""
    out, _ = trained_run
    folder = tmp_path_factory.mktemp("export") / "fp32"
    assert export("--model", out / "best", "--output_dir", folder) == 0
    return folder


@needs_onnx
def test_fp32_export_agrees_with_the_trained_model_on_the_runs_dev_file(fp32_export, synthetic_data):
    """Without --check_file, the export is checked on the run's dev file (run_config.json), and agrees: the
    folder holds the graph, the config with the labels, the tokenizer and the report."""
    report = report_of(fp32_export)
    assert report["check"]["file"] == str(synthetic_data["dev"])
    assert_agrees(report["check"], pairs=lines(synthetic_data["dev"]))
    assert report["precision"] == "fp32" and report["labels"] == ["0", "1"]
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    names = {p.name for p in fp32_export.iterdir()}
    assert {MODEL_FILE, REPORT, "config.json", "tokenizer.json"} <= names
    assert not [name for name in names if "tmp" in name or "fp32" in name]


@needs_onnx
def test_fp32_export_agrees_on_the_sample_data_and_replaces_an_earlier_export(fp32_export, trained_run, tmp_path,
                                                                               capsys):
    """The bundled sample dev file as --check_file; --output_dir holding an earlier export is replaced by the new
    one (nothing else is ever replaced)."""
    folder = tmp_path / "export"
    shutil.copytree(fp32_export, folder)
    sample = SAMPLE_DIR / "dev.json"
    assert export("--model", trained_run[0] / "best", "--output_dir", folder, "--check_file", sample) == 0
    report = report_of(folder)
    assert report["check"]["file"] == str(sample)
    assert_agrees(report["check"], pairs=lines(sample))
    assert f"to {folder}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.fixture(scope="module")
def three_label_cls_run(tiny_model, tmp_path_factory):
    """A 3-label run (labels a, b, c: how many of the two sentences carry the planted token) with the tutorial's
    [CLS] head, trained in this process."""
    from accelerate.state import AcceleratorState, GradientState

    from afqmc_dist.cli import main as train

    root = tmp_path_factory.mktemp("three-labels")

    def relabel(rows):
        return [{**r, "label": "abc"[(PLANTED in r["sentence1"]) + (PLANTED in r["sentence2"])]} for r in rows]

    train_file = write_jsonl(root / "train.json", relabel(synthetic_pairs(256, seed=5)))
    dev_file = write_jsonl(root / "dev.json", relabel(synthetic_pairs(90, seed=6)))
    out = root / "out"
    status = train([str(a) for a in ["--model_checkpoint", tiny_model, "--train_file", train_file, "--dev_file",
                                     dev_file, "--output_dir", out, "--do_train", "--head", "cls", "--label_list",
                                     "a", "b", "c", "--positive_label", "b", "--num_train_epochs", "2",
                                     "--batch_size", "16", "--learning_rate", "2e-3"]])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert status == 0
    return out, dev_file


@needs_onnx
@pytest.mark.slow
def test_fp32_export_of_a_three_label_cls_head_model_agrees(three_label_cls_run, tmp_path):
    """The [CLS] head (loaded by load_trained_model, whatever its class) and 3 labels: the same agreement."""
    out, dev_file = three_label_cls_run
    assert "ClsPairClassifier" in json.loads((out / "best" / "config.json").read_text())["architectures"][0]
    folder = tmp_path / "export"
    assert export("--model", out / "best", "--output_dir", folder) == 0
    report = report_of(folder)
    assert report["labels"] == ["a", "b", "c"] and report["architecture"].endswith("ClsPairClassifier")
    assert_agrees(report["check"], pairs=lines(dev_file))


def build_tiny_roberta(folder) -> None:
    """A random RoBERTa classifier with a byte-level BPE trained on the sample data, saved as best/ is."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer

    rows = [json.loads(line) for name in ("train.json", "dev.json")
            for line in (SAMPLE_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [row[key] for row in rows for key in ("sentence1", "sentence2")]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = RobertaTokenizer(tokenizer_object=bpe)
    pad = tokenizer.pad_token_id
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, type_vocab_size=1, pad_token_id=pad,
                           max_position_embeddings=512 + pad + 1, id2label={0: "0", 1: "1"},
                           label2id={"0": 0, "1": 1})
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@needs_onnx
def test_a_roberta_model_exports_without_segment_ids(tmp_path):
    """A RoBERTa-family model (one token type): the graph takes no token_type_ids, and agrees on the sample data;
    the runtime model takes them and ignores them, as the prediction code passes them to every model."""
    import torch

    from afqmc_dist.export.runtime import load_exported

    build_tiny_roberta(tmp_path / "best")
    folder = tmp_path / "export"
    sample = SAMPLE_DIR / "dev.json"
    assert export("--model", tmp_path / "best", "--output_dir", folder, "--check_file", sample) == 0
    report = report_of(folder)
    assert report["inputs"] == ["input_ids", "attention_mask"] and report["model_type"] == "roberta"
    assert_agrees(report["check"], pairs=lines(sample))
    model, tokenizer = load_exported(str(folder), prefer_cuda=False)
    batch = tokenizer(["花呗如何还款"], ["花呗怎么还钱"], return_tensors="pt", return_token_type_ids=True)
    without = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(model(**batch).logits, without)


def torch_and_runtime(best, folder, rows, batch_size):
    """Probabilities of the torch model on best/ and of the runtime model on the export, for the same batches."""
    import torch

    from afqmc_dist.export.check import make_batches
    from afqmc_dist.export.runtime import load_exported
    from afqmc_dist.model import load_trained_model
    from afqmc_dist.pairs import PairExample

    trained, tokenizer = load_trained_model(str(best))
    exported, _ = load_exported(str(folder), prefer_cuda=False)
    examples = [PairExample(r["sentence1"], r["sentence2"], None, r) for r in rows]
    batches, _ = make_batches(tokenizer, examples, 128, batch_size)
    with torch.inference_mode():
        ours = torch.cat([trained.eval()(**batch).logits for batch in batches]).softmax(-1)
        theirs = torch.cat([exported.eval().to("cpu")(**batch).logits for batch in batches]).softmax(-1)
    return ours, theirs, exported


@needs_onnx
def test_the_runtime_model_equals_the_torch_model(fp32_export, trained_run):
    """load_exported's model, called as evaluation.predict calls the torch model (torch LongTensors in, `.logits`
    out: float32 [B, num_labels]), gives the torch model's labels and probabilities within 1e-4: on pairs unlike
    the check file's, in batches of 16 and of 1 (no padding), with the run's labels in its config."""
    import torch

    from afqmc_dist.export.runtime import is_exported

    rows = synthetic_pairs(40, seed=21)
    for batch_size in (16, 1):
        ours, theirs, model = torch_and_runtime(trained_run[0] / "best", fp32_export, rows, batch_size)
        assert theirs.dtype == torch.float32 and theirs.shape == (40, 2)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
        assert (ours - theirs).abs().max() <= 1e-4
    assert model.config.id2label == {0: "0", 1: "1"}
    assert is_exported(fp32_export) and not is_exported(trained_run[0] / "best")


@needs_onnx
def test_predict_on_an_export_gives_what_predict_on_best_gives(fp32_export, trained_run, tmp_path,
                                                                fresh_accelerate_state):
    """`python -m afqmc_dist.predict --model EXPORT`: the streaming path with ONNX Runtime in the model's place;
    the same labels as best/ and probabilities within 1e-4, the CLUE file too."""
    from afqmc_dist.predict import main as predict

    rows = [{"id": i, **r} for i, r in enumerate(synthetic_pairs(40, seed=23))]
    pairs = write_jsonl(tmp_path / "pairs.json", rows)
    outputs = {}
    for name, model in (("torch", trained_run[0] / "best"), ("onnx", fp32_export)):
        outputs[name] = tmp_path / name / "preds.jsonl"
        assert predict(["--model", str(model), "--input", str(pairs), "--output", str(outputs[name]), "--cpu"]) == 0
    torch_rows, onnx_rows = (read_jsonl(outputs[n]) for n in ("torch", "onnx"))

    assert [r["pred_label"] for r in onnx_rows] == [r["pred_label"] for r in torch_rows]
    assert [r["pred_prob"] for r in onnx_rows] == pytest.approx([r["pred_prob"] for r in torch_rows], abs=1e-4)
    assert read_jsonl(outputs["onnx"].parent / "afqmc_predict.json") == [
        {"id": r["id"], "label": r["pred_label"]} for r in torch_rows]


def varied_pairs(n: int, seed: int) -> list[dict]:
    """Pairs unlike the training data: 1 to 40 filler characters, the planted one 0 to 3 times in each sentence."""
    rng = random.Random(seed)

    def sentence():
        chars = rng.choices(FILLER, k=rng.randint(1, 40))
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            chars.insert(rng.randrange(len(chars) + 1), PLANTED)
        return "".join(chars)

    return [{"sentence1": sentence(), "sentence2": sentence()} for _ in range(n)]


@pytest.fixture(scope="module")
def int8_changes(fp32_export, trained_run, tmp_path_factory):
    """A check file on which int8 loses accuracy, and how many of its labels int8 changes.

    On the task's own pairs int8 changes no label of this model (it is confident), so the check file is found
    among 8000 varied pairs by running both models on them, in the export check's batches (64 pairs, longest
    first): the batch in which the int8 model (the export's graph through ONNX Runtime's dynamic quantization, as
    --quantize int8 makes it) changes the most labels. Dynamic quantization scales each batch's activations by
    their own range, so a pair's int8 answer depends on its batch: the file holds exactly that batch, in its
    order, which the check rebuilds as it was. Each pair is labelled with the trained model's answer: the trained
    model scores 1.0 on the file, and every changed label is a point the int8 model loses.
    """
    import torch

    from afqmc_dist.export.check import CheckSet, exported_caller, make_batches, run_model, torch_caller
    from afqmc_dist.export.graph import quantize_int8
    from afqmc_dist.export.runtime import load_exported
    from afqmc_dist.model import load_trained_model
    from afqmc_dist.pairs import PairExample

    root = tmp_path_factory.mktemp("int8-probe")
    probe = root / "probe"
    shutil.copytree(fp32_export, probe)
    quantize_int8(str(fp32_export / MODEL_FILE), str(probe / MODEL_FILE))
    trained, tokenizer = load_trained_model(str(trained_run[0] / "best"))
    rows = varied_pairs(8000, seed=5)
    batches, order = make_batches(tokenizer, [PairExample(r["sentence1"], r["sentence2"], None, r) for r in rows],
                                  128, 64)
    check = CheckSet("pool", batches, order, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 125 small batches: one thread is faster than two on a busy machine
    try:
        ours = run_model(torch_caller(trained, ["input_ids", "attention_mask", "token_type_ids"]), check).pred_ids
    finally:
        torch.set_num_threads(threads)
    theirs = run_model(exported_caller(load_exported(str(probe), prefer_cuda=False)[0]), check).pred_ids
    in_batches = order.split(64)
    batch = max(in_batches, key=lambda rows_of: int((ours[rows_of] != theirs[rows_of]).sum())).tolist()
    changed = sum(int(ours[i] != theirs[i]) for i in batch)
    assert changed >= 1, "int8 changes no label of these pairs: the refusal below would mean nothing"
    picked = [{**rows[i], "label": str(int(ours[i]))} for i in batch]
    return write_jsonl(root / "check.json", picked), changed


@needs_onnx
def test_int8_is_refused_when_it_loses_more_accuracy_than_allowed(int8_changes, trained_run, tmp_path, capsys):
    """--quantize int8 with the default --max_accuracy_drop (0.005) on a check file where int8 changes labels:
    refused with one line giving both accuracies, exit 2, and nothing left (not even the parents it created)."""
    check_file, _ = int8_changes
    folder = tmp_path / "new" / "export"
    status = export("--model", trained_run[0] / "best", "--output_dir", folder, "--quantize", "int8",
                    "--check_file", check_file)
    assert status == 2
    line = assert_refused(capsys, folder, "--quantize int8", "--max_accuracy_drop 0.005")
    assert f"accuracy on {check_file} drops from 1.0000 to" in line
    assert not (tmp_path / "new").exists()


@needs_onnx
def test_int8_is_accepted_when_the_drop_is_within_the_allowance(int8_changes, trained_run, tmp_path):
    """The same check file with a loose --max_accuracy_drop: written, the int8 graph smaller than the fp32 one,
    the report giving the real drop (each changed label one lost point) and the fp32 graph's own check."""
    check_file, changed = int8_changes
    folder = tmp_path / "export"
    assert export("--model", trained_run[0] / "best", "--output_dir", folder, "--quantize", "int8",
                  "--check_file", check_file, "--max_accuracy_drop", "0.5") == 0
    report = report_of(folder)
    check, pairs = report["check"], lines(check_file)
    assert report["precision"] == "int8" and report["max_accuracy_drop"] == 0.5
    assert check["accuracy_trained"] == 1.0 and check["labels_changed"] == changed
    assert check["accuracy_drop"] == pytest.approx(changed / pairs)
    assert 0.005 < check["accuracy_drop"] <= 0.5
    assert_agrees(report["fp32_check"], pairs=pairs)
    assert not (folder / "model.fp32.onnx").exists()


@needs_onnx
def test_a_base_checkpoint_is_refused(tiny_model, tmp_path, capsys):
    """A checkpoint without a trained head (what tiny_model writes): one line, exit 2, nothing written."""
    folder = tmp_path / "export"
    assert export("--model", tiny_model, "--output_dir", folder, "--check_file", SAMPLE_DIR / "dev.json") == 2
    assert_refused(capsys, folder, str(tiny_model), "no trained classification head")


@needs_onnx
def test_an_unsupported_architecture_is_refused(tiny_model, tmp_path, capsys):
    """A classifier of a family the tool does not support (GPT-2): one line naming it, exit 2, nothing written."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    best = tmp_path / "best"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, pad_token_id=0, num_labels=2)
    GPT2ForSequenceClassification(config).save_pretrained(best)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(best)
    folder = tmp_path / "export"
    assert export("--model", best, "--output_dir", folder, "--check_file", SAMPLE_DIR / "dev.json") == 2
    assert_refused(capsys, folder, str(best), "'gpt2'", "bert")


def test_an_output_dir_holding_something_else_is_refused(trained_run, tmp_path, capsys):
    """--output_dir that is not empty and not an earlier export (here: the run's own folder, and a folder with one
    file) is refused before any work, and left exactly as it was."""
    out = trained_run[0]
    before = sorted(p.name for p in out.iterdir())
    assert export("--model", out / "best", "--output_dir", out) == 2
    assert f"--output_dir {out} holds other files" in last_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert export("--model", out / "best", "--output_dir", other) == 2
    assert "todo.txt" in last_error_line(capsys.readouterr().err)
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


def test_a_missing_check_file_is_one_line(trained_run, tiny_model, tmp_path, capsys):
    """A --check_file that does not exist, and a model with no run beside it and no --check_file: one line
    each, exit 2, nothing written."""
    folder = tmp_path / "export"
    missing = tmp_path / "nope.json"
    assert export("--model", trained_run[0] / "best", "--output_dir", folder, "--check_file", missing) == 2
    assert_refused(capsys, folder, f"--check_file {missing}: no such file")
    assert export("--model", tiny_model, "--output_dir", folder) == 2
    assert_refused(capsys, folder, "--check_file is needed", str(tiny_model))


def test_the_export_command_runs_as_a_module_with_one_line_errors(tmp_path):
    """`python -m afqmc_dist.export` in a fresh process: a missing --model is one line and exit status 2."""
    result = subprocess.run([sys.executable, "-m", "afqmc_dist.export", "--model", tmp_path / "nope",
                             "--output_dir", tmp_path / "out"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--model" in last_error_line(result.stderr) and "no such folder" in result.stderr


def test_training_and_prediction_never_import_onnx():
    """onnx and onnxruntime are optional: the training and prediction modules (and the runtime module, until a
    model is loaded) import neither."""
    code = ("import sys, afqmc_dist.cli, afqmc_dist.run, afqmc_dist.predict, afqmc_dist.export.runtime; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
