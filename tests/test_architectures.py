"""Every encoder family the tool is tested with (architectures.py), each a tiny random model laid out as its Hub
checkpoints are, with a real tokenizer of its kind trained on the spot: WordPiece (BERT, ERNIE, ELECTRA,
MegatronBERT), SentencePiece-style Unigram (XLM-R, DeBERTa-v2), byte-level BPE (RoBERTa, ModernBERT).

Per family, with the standard head: it trains on 2 processes (a real launch, gloo) to the dev predictions of 1
process with the same global batch (dropout 0); best/ reloads with the run's predictions; the predict CLI agrees;
a run killed with SIGKILL and resumed with --resume_from_checkpoint latest ends with the uninterrupted run's
weights, bit for bit. With the tutorial's [CLS] head: it trains, and best/ reloads with the run's predictions.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_tree, read_jsonl, run_tool, start_tool, synthetic_pairs, write_jsonl
from safetensors.torch import load_file

from afqmc_dist.architectures import FAMILIES, max_tokens
from afqmc_dist.cli import main
from afqmc_dist.model import load_trained_model
from afqmc_dist.predict import main as predict_main
from afqmc_dist.tiny_model import build_tiny_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
STEPS, EVERY = 30, 10  # optimizer steps, and a checkpoint every EVERY of them
TOLERANCE = 1e-4  # 1 vs 2 processes: the same sums in another order


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-data")
    return {"train": write_jsonl(root / "train.json", synthetic_pairs(160, seed=11)),
            "dev": write_jsonl(root / "dev.json", synthetic_pairs(41, seed=12))}


@pytest.fixture(scope="module")
def models(data, tmp_path_factory) -> dict[str, Path]:
    """One tiny model per family (hidden 32, 1 layer, dropout 0: runs on any layout compare exactly)."""
    root = tmp_path_factory.mktemp("families")
    return {family: Path(build_tiny_model(str(root / family), family, [str(data["train"]), str(data["dev"])],
                                          hidden_size=32, num_layers=1, dropout=0.0)) for family in FAMILIES}


def args(model: Path, data: dict, out: Path, *extra) -> list[str]:
    return [str(a) for a in ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"],
                             "--predict_file", data["dev"], "--output_dir", out, "--do_train", "--do_predict",
                             "--max_steps", STEPS, "--global_batch_size", 16, "--eval_steps", 15,
                             "--checkpointing_steps", EVERY, "--learning_rate", "2e-3", "--seed", 3,
                             "--cache_dir", "none", *extra]]


def predicted(out: Path, name: str = "predictions.jsonl") -> list[tuple[str, float]]:
    return [(row["pred_label"], row["pred_prob"]) for row in read_jsonl(out / name)]


def reload_and_predict(best: Path, data: dict, out: Path) -> list[tuple[str, float]]:
    """The predict CLI's predictions of the dev file with `best` (in this process, as `python -m` runs it)."""
    assert predict_main(["--model", str(best), "--input", str(data["dev"]), "--output", str(out), "--cpu"]) == 0
    return predicted(out.parent, out.name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_on_two_processes_reloads_predicts_and_resumes_exactly(family, models, data, tmp_path,
                                                                                  capfd):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert main(args(models[family], data, one)) == 0  # the uninterrupted run on 1 process
    config = json.loads((one / "run_config.json").read_text())
    assert config["model_type"] == family and config["attn_implementation"] in ("sdpa", "eager")

    launched = run_tool(args(models[family], data, two), script="cpu_debug_2proc.sh")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 process(es)" in launched.stdout
    for a, b in zip(predicted(one), predicted(two), strict=True):
        assert a[0] == b[0] and abs(a[1] - b[1]) <= TOLERANCE, "1 and 2 processes train the same model"

    assert reload_and_predict(two / "best", data, tmp_path / "cli.jsonl") == predicted(two)
    model, _ = load_trained_model(str(two / "best"))
    assert type(model).__name__.endswith("ForSequenceClassification") and model.config.model_type == family

    run = start_tool(args(models[family], data, killed))
    first = killed / "checkpoints" / f"step_{EVERY}"
    while not (first / "checksums.sha256").exists():
        assert run.poll() is None, run.communicate()[1][-3000:]
        time.sleep(0.005)
    kill_tree(run.pid)  # SIGKILL, as a lost node
    run.communicate()
    assert run.returncode == -signal.SIGKILL
    capfd.readouterr()
    assert main(args(models[family], data, killed, "--resume_from_checkpoint", "latest")) == 0
    assert f"resumed from {first}" in capfd.readouterr().out
    want, got = (load_file(out / "best" / "model.safetensors") for out in (one, killed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_with_the_cls_head_and_reloads_it(family, models, data, tmp_path):
    out = tmp_path / "out"
    assert main(args(models[family], data, out, "--head", "cls", "--max_steps", 6, "--checkpointing_steps",
                     6)) == 0
    model, _ = load_trained_model(str(out / "best"))
    assert type(model).__name__.endswith("ClsPairClassifier")
    assert json.loads((out / "best" / "config.json").read_text())["architectures"] == [type(model).__name__]
    assert reload_and_predict(out / "best", data, tmp_path / "cli.jsonl") == predicted(out)


def test_segment_ids_go_only_to_models_with_two_token_types(models):
    from transformers import AutoModelForSequenceClassification

    from afqmc_dist.architectures import takes_token_types

    takes = {family: takes_token_types(AutoModelForSequenceClassification.from_pretrained(models[family]))
             for family in FAMILIES}
    assert takes == {"bert": True, "roberta": False, "xlm-roberta": False, "ernie": True, "electra": True,
                     "deberta-v2": False, "megatron-bert": True, "modernbert": False}


def test_a_roberta_family_model_holds_two_tokens_fewer_than_its_positions(models, data, tmp_path, capsys):
    """RoBERTa-family positions start after the padding index: 514 positions hold 512 tokens."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models["xlm-roberta"])
    assert max_tokens(config) == config.max_position_embeddings - config.pad_token_id - 1 == 512
    assert main(args(models["xlm-roberta"], data, tmp_path / "out", "--max_seq_length", 513)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --max_seq_length 513 exceeds what --model_checkpoint {models['xlm-roberta']} "
                           f"holds: {config.max_position_embeddings} positions, which hold 512 tokens")
    assert not (tmp_path / "out").exists()


def test_an_untested_architecture_is_refused_before_any_work_unless_allowed(data, tmp_path, capsys):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from afqmc_dist.tiny_model import family_tokenizer, vocab_from_files

    folder = tmp_path / "distilbert"
    tokenizer = family_tokenizer("bert", [], vocab_from_files([str(data["train"]), str(data["dev"])]))
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, hidden_dim=64, n_layers=1, n_heads=2)
                          ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    assert main(args(folder, data, tmp_path / "refused", "--max_steps", 2)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"error: --model_checkpoint {folder} is a 'distilbert' model, an architecture this tool has not "
                    f"been tested with (tested: {', '.join(FAMILIES)}); pass --allow_untested_architecture to try "
                    "it anyway")
    assert not (tmp_path / "refused").exists()
    assert main(args(folder, data, tmp_path / "allowed", "--max_steps", 2, "--allow_untested_architecture")) == 0


@pytest.mark.parametrize("head", ["standard", "cls"])
def test_a_base_checkpoint_of_each_family_leaves_only_its_pretraining_heads_unused_and_says_nothing(models, head,
                                                                                                     capfd):
    """Each family's checkpoints carry their own pretraining heads (architectures.py); any other unused weight is
    a warning (tests/test_model.py)."""
    from afqmc_dist.config import RunConfig
    from afqmc_dist.model import build_model_and_tokenizer

    for family in FAMILIES:
        build_model_and_tokenizer(RunConfig(model_checkpoint=str(models[family]), head=head))
        captured = capfd.readouterr()
        assert captured.err == "", (family, captured.err)
        assert "initialised from scratch" in captured.out, (family, captured.out)
