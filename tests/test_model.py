"""Model heads and loading: the tutorial's [CLS] head round-trips exactly; config-less BERTs load with --model_type;
a folder that cannot be used is one line saying what is wrong with it; loading prints our lines, not the library's."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import predict_rows, read_jsonl, run_tool, train_args
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from afqmc_dist.config import RunConfig
from afqmc_dist.errors import UserError
from afqmc_dist.model import (
    build_model_and_tokenizer,
    cls_head_class,
    load_trained_config,
    load_trained_model,
)

BertClsPairClassifier = cls_head_class(BertConfig())  # the [CLS] head on BERT, as `--head cls` builds it


@pytest.mark.slow
def test_cls_head_saves_and_reloads_exactly_through_the_projects_loader(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "out"
    result = run_tool(train_args(tiny_model, synthetic_data, out, "--head", "cls", "--num_train_epochs", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    best = out / "best"
    assert json.loads((best / "config.json").read_text())["architectures"] == ["BertClsPairClassifier"]
    saved = load_file(best / "model.safetensors")
    assert "classifier.weight" in saved
    assert not any("pooler" in name for name in saved), "the tutorial head has no pooler"

    model, tokenizer = load_trained_model(str(best))
    assert isinstance(model, BertClsPairClassifier)
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(state[name], saved[name]) for name in saved)
    tool_preds = [int(p["pred_label"]) for p in read_jsonl(out / "predictions.jsonl")]
    assert predict_rows(model, tokenizer, read_jsonl(synthetic_data["dev"])) == tool_preds


@pytest.fixture
def config_without_model_type(tiny_model, tmp_path):
    """A BERT checkpoint whose config.json has no model_type, as hfl/chinese-roberta-wwm-ext ships."""
    checkpoint = tmp_path / "chinese-roberta-wwm-ext"
    shutil.copytree(tiny_model, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["model_type"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint


def test_checkpoint_without_model_type_needs_the_flag(config_without_model_type):
    with pytest.raises(UserError, match="pass --model_type bert"):
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(config_without_model_type)))


@pytest.mark.parametrize("head", ["seq", "cls"])
def test_model_type_bert_loads_the_encoder_weights_with_bert_classes(config_without_model_type, head):
    cfg = RunConfig(model_checkpoint=str(config_without_model_type), model_type="bert", head=head)
    model, tokenizer = build_model_and_tokenizer(cfg)
    assert isinstance(model, BertClsPairClassifier if head == "cls" else BertForSequenceClassification)
    pretrained = load_file(config_without_model_type / "model.safetensors")
    name = next(k for k in pretrained if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, pretrained[name]), "encoder weights loaded"
    assert model.config.id2label == {0: "0", 1: "1"}
    assert tokenizer("花", "还")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.parametrize("name", ["./models/nope", "models/../nope", "{tmp}/nope"])
def test_a_missing_local_folder_is_said_to_be_missing(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = name.format(tmp=tmp_path)
    with pytest.raises(UserError) as info:
        build_model_and_tokenizer(RunConfig(model_checkpoint=path))
    assert str(info.value) == f"--model_checkpoint {path}: no such folder"


def test_a_name_that_can_be_a_hub_model_still_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such local folder; HF_HUB_OFFLINE=1 (conftest): the hub cannot answer
    with pytest.raises(UserError, match=r"^--model_checkpoint bert-base-chinese: no such folder, and no model of "
                                        r"that name could be loaded from the hub \(.+\)$"):
        build_model_and_tokenizer(RunConfig(model_checkpoint="bert-base-chinese"))


def copy_of(model: Path, folder: Path, damage: str) -> Path:
    """A copy of the model folder `model`, damaged in one way."""
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    if damage == "random weights":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif damage == "weights cut short":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif damage == "no weights":
        weights.unlink()
    elif damage == "no config.json":
        (folder / "config.json").unlink()
    elif damage == "hidden_size 'abc'":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "abc"}))
    elif damage == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    return folder


BAD_FOLDERS = {
    "random weights": "model.safetensors is damaged or incomplete (Error while deserializing header",
    "weights cut short": "model.safetensors is damaged or incomplete (Error while deserializing header: incomplete "
                         "metadata, file not fully covered",
    "no weights": "no weights in the folder (model.safetensors or pytorch_model.bin)",
    "no config.json": "no config.json in the folder (it holds model.safetensors, tokenizer.json, "
                      "tokenizer_config.json): not a Hugging Face model folder",
    "hidden_size 'abc'": "cannot load (Validation error for field 'hidden_size': TypeError: Field 'hidden_size' "
                         "expected int, got str (value: 'abc'))",
    "empty": "the folder is empty (no config.json, no weights)",
}


@pytest.mark.parametrize("damage, message", BAD_FOLDERS.items(), ids=BAD_FOLDERS.keys())
def test_a_bad_checkpoint_folder_is_one_line_saying_what_is_wrong(tiny_model, tmp_path, damage, message):
    folder = copy_of(tiny_model, tmp_path / "model", damage)
    with pytest.raises(UserError) as info:
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(folder)))
    assert str(info.value).startswith(f"--model_checkpoint {folder}: {message}"), str(info.value)
    assert "\n" not in str(info.value) and "--model_type" not in str(info.value)


@pytest.fixture(scope="module")
def trained_folder(tiny_model, tmp_path_factory) -> Path:
    """A folder as OUTPUT_DIR/best holds one: a sequence classifier with every weight, and its tokenizer."""
    folder = tmp_path_factory.mktemp("best") / "best"
    model, tokenizer = build_model_and_tokenizer(RunConfig(model_checkpoint=str(tiny_model)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_trained_folder_loads_back_with_every_weight(trained_folder, capfd):
    model, _ = load_trained_model(str(trained_folder))
    saved = load_file(trained_folder / "model.safetensors")
    assert all(torch.equal(model.state_dict()[name], saved[name]) for name in saved)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("damage", ["random weights", "weights cut short", "hidden_size 'abc'"])
def test_a_damaged_trained_folder_is_refused_when_its_config_is_read(trained_folder, tmp_path, damage):
    """`load_trained_config` is what a run checks before it writes anything: the damage must show there."""
    folder = copy_of(trained_folder, tmp_path / "best", damage)
    with pytest.raises(UserError, match=f"^{re.escape(str(folder))}: cannot load the trained model"):
        load_trained_config(str(folder))


def test_a_base_checkpoint_is_no_trained_model(tiny_model):
    with pytest.raises(UserError) as info:
        load_trained_model(str(tiny_model))
    assert str(info.value) == (f"{tiny_model}: no trained classification head: classifier.bias, classifier.weight not "
                               "in its weights (a base checkpoint, not a model fine-tuned by this tool: train one "
                               "with --do_train)")


# --- what loading says --------------------------------------------------------------------------------------

HEAD_LINE = "classifier head initialised from scratch, as expected when fine-tuning a base checkpoint\n"


@pytest.mark.parametrize("head", ["seq", "cls"])
def test_a_new_classifier_is_one_line_of_ours_not_the_librarys_load_report(tiny_model, capfd, head):
    build_model_and_tokenizer(RunConfig(model_checkpoint=str(tiny_model), head=head))
    captured = capfd.readouterr()
    assert captured.out == HEAD_LINE
    assert captured.err == "", "no LOAD REPORT table, no progress bar"


def test_the_line_is_printed_by_rank_0_only(tiny_model, capfd, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    build_model_and_tokenizer(RunConfig(model_checkpoint=str(tiny_model)))
    assert capfd.readouterr().out == ""


def test_weights_the_model_does_not_use_are_still_shown_in_full(tiny_model, tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = load_file(folder / "model.safetensors")
    extra = {"adapter.dense.weight": torch.zeros(2, 2), "adapter.dense.bias": torch.zeros(2)}
    save_file({**weights, **extra}, folder / "model.safetensors", metadata={"format": "pt"})

    build_model_and_tokenizer(RunConfig(model_checkpoint=str(folder)))

    captured = capfd.readouterr()
    assert captured.out == HEAD_LINE
    assert captured.err == (f"warning: --model_checkpoint {folder}: 2 weights of the checkpoint are not used by the "
                            "model (they do not belong to it: is it the right checkpoint?):\n"
                            "    adapter.dense.bias\n    adapter.dense.weight\n")


def test_weights_of_another_shape_than_the_config_says_are_named(tiny_model, tmp_path):
    """Not taken for a classifier with another number of labels: the encoder's own weights differ."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(UserError, match=r": 6 weights have other shapes than its config.json says: "
                                        r"bert\.encoder\.layer\.0\.intermediate\.dense\.bias \(checkpoint \[256\], "
                                        r"model \[96\]\), .* and 3 more$"):
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(folder)))


def test_a_checkpoint_without_tokenizer_files_is_refused(tiny_model, tmp_path):
    """AutoTokenizer would quietly build a 5-token tokenizer and the run would train on [UNK]s."""
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, weights_only / name)
    with pytest.raises(UserError, match="lacks its tokenizer files"):
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(weights_only)))


def test_a_model_type_that_does_not_fit_the_weights_is_refused(tiny_model):
    with pytest.raises(UserError, match=r"encoder weights are not in the checkpoint .*is --model_type right\?"):
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(tiny_model), model_type="gpt2"))


def test_max_seq_length_beyond_the_models_positions_is_refused(tiny_model):
    with pytest.raises(UserError, match="--max_seq_length 1024 exceeds what --model_checkpoint .* holds: "
                                        "512 positions"):
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(tiny_model), max_seq_length=1024))


def test_a_fine_tuned_checkpoint_with_another_label_count_is_refused(trained_run):
    out, _ = trained_run
    cfg = RunConfig(model_checkpoint=str(out / "best"), label_list=["0", "1", "2"])
    with pytest.raises(UserError, match="already has a classifier, for another number of labels"):
        build_model_and_tokenizer(cfg)


def test_an_incomplete_trained_model_folder_is_one_clear_error(tiny_model, tmp_path):
    broken = tmp_path / "best"
    broken.mkdir()
    shutil.copy(tiny_model / "config.json", broken / "config.json")
    with pytest.raises(UserError, match="cannot load the trained model"):
        load_trained_model(str(broken))
