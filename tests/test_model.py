"""Model heads and loading: the tutorial's [CLS] head round-trips exactly; config-less BERTs load with --model_type."""

import json
import shutil

import pytest
import torch
from conftest import predict_rows, read_jsonl, run_tool, train_args
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from afqmc_dist.config import RunConfig
from afqmc_dist.errors import UserError
from afqmc_dist.model import BertClsPairClassifier, build_model_and_tokenizer, load_trained_model


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


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"--model_checkpoint .*nowhere: cannot load"):
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(tmp_path / "nowhere")))


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
    with pytest.raises(UserError, match="--max_seq_length 1024 exceeds the 512 positions"):
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
