"""The training recipes (training/recipes.py and the modules it sets up): each one computes what its formula says,
keeps the tool's guarantees (the loss is the mean over the global batch on any number of processes; a killed run
resumes bit for bit), and refuses bad values in one line.

Hand computations use plain Python floats or float64 tensors and the formulas of the module docstrings, never the
code under test.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from conftest import (
    FILLER,
    PLANTED,
    ROOT,
    kill_tree,
    read_jsonl,
    run_tool,
    start_tool,
    synthetic_pairs,
    without_timing,
    write_jsonl,
)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from afqmc_dist.arguments import parse_config
from afqmc_dist.cli import main
from afqmc_dist.config import RunConfig
from afqmc_dist.errors import UserError
from afqmc_dist.tiny_model import SPECIAL_TOKENS, build_tiny_bert, build_tiny_model
from afqmc_dist.training.adversarial import FGM
from afqmc_dist.training.ema import WeightAverage
from afqmc_dist.training.loss import Objective, class_weights
from afqmc_dist.training.optimizer import make_optimizer
from afqmc_dist.training.recipes import check_engine

LOGITS = [[2.0, -1.0], [0.5, 0.25], [-1.5, 1.0]]
LABELS = [0, 1, 1]


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - norm for v in row]


# --- the loss ---------------------------------------------------------------------------------------------------


def test_a_weighted_smoothed_loss_is_the_hand_computed_one():
    weights, s = [0.7, 1.9], 0.1
    objective = Objective(torch.tensor(weights), label_smoothing=s)

    got = objective.per_pair(torch.tensor(LOGITS), torch.tensor(LABELS)).tolist()

    for row, label, value in zip(LOGITS, LABELS, got):
        logp = log_softmax(row)
        smoothed = (1 - s) * -logp[label] + s / 2 * sum(-v for v in logp)
        assert value == pytest.approx(weights[label] * smoothed, rel=1e-6)


class DropoutClassifier(torch.nn.Module):
    """A real module with dropout: its two passes over a pair differ, as a transformer's do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.dropout = torch.nn.Linear(4, 2), torch.nn.Dropout(0.5)

    def forward(self, features):
        return type("Output", (), {"logits": self.linear(self.dropout(features))})()


def test_r_drop_adds_alpha_times_the_symmetric_kl_of_two_dropout_passes_to_their_mean_cross_entropy():
    model, alpha = DropoutClassifier().train(), 4.0
    features, labels = torch.randn(3, 4), torch.tensor(LABELS)
    batch = {"features": features, "labels": labels, "weight": torch.tensor([1.0, 1.0, 0.0])}  # a padding copy
    torch.manual_seed(5)
    loss, summed = Objective(rdrop_alpha=alpha)(model, batch, scale=0.5)
    torch.manual_seed(5)  # the same dropout masks: the objective's forward is one pass over the batch twice
    first, second = model(torch.cat([features, features])).logits.double().chunk(2)

    expected = 0.0
    for i in range(2):  # the third pair is a padding copy: it does not count
        p, q = first[i].log_softmax(-1), second[i].log_softmax(-1)
        ce = (-p[LABELS[i]] - q[LABELS[i]]) / 2
        kl = ((p.exp() * (p - q)).sum() + (q.exp() * (q - p)).sum()) / 2
        expected += ce + alpha * kl
    assert summed.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert not torch.equal(first, second), "two dropout masks"
    assert set(batch) == {"features", "labels", "weight"}, "the batch is left as it was (FGM runs it again)"


def config(**options) -> RunConfig:
    return RunConfig(train_file="train.json", **options)


def test_auto_class_weights_are_the_inverse_label_frequency_with_mean_one():
    counts = {0: 69, 1: 31}  # AFQMC's balance

    weights = class_weights(config(class_weights="auto"), counts)

    assert weights == pytest.approx([100 / (2 * 69), 100 / (2 * 31)])
    assert sum(weights[label] * n for label, n in counts.items()) / 100 == pytest.approx(1.0)
    assert class_weights(config(class_weights="0.5,2"), counts) == [0.5, 2.0]
    assert class_weights(config(), counts) is None


def test_auto_class_weights_refuse_a_label_without_training_pairs():
    with pytest.raises(UserError, match=r"^--class_weights auto: label '1' has no pair in --train_file train.json"):
        class_weights(config(class_weights="auto"), {0: 10})


# --- layer-wise learning rates ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, torch.nn.Module]:
    """A 2-layer classifier of three families whose parameter names differ (BERT; DeBERTa-v2 with encoder-level
    relative embeddings; ModernBERT with `layers.N` and a final norm)."""
    models = {}
    for family in ("bert", "deberta-v2", "modernbert"):
        folder = tmp_path_factory.mktemp(family)
        build_tiny_model(str(folder), family, hidden_size=32, num_layers=2, num_heads=2)
        models[family] = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    return models


# Per family: a parameter of each depth (embeddings, layer 1, layer 2, above the encoder) -> its depth.
DEPTHS = {
    "bert": {"bert.embeddings.word_embeddings.weight": 0, "bert.embeddings.LayerNorm.weight": 0,
             "bert.encoder.layer.0.attention.self.query.weight": 1, "bert.encoder.layer.1.output.dense.bias": 2,
             "bert.pooler.dense.weight": 3, "classifier.weight": 3},
    "deberta-v2": {"deberta.embeddings.word_embeddings.weight": 0, "deberta.encoder.rel_embeddings.weight": 0,
                   "deberta.encoder.layer.0.attention.self.query_proj.weight": 1,
                   "deberta.encoder.layer.1.output.dense.weight": 2, "classifier.weight": 3},
    "modernbert": {"model.embeddings.tok_embeddings.weight": 0, "model.layers.0.attn.Wqkv.weight": 1,
                   "model.layers.1.mlp.Wo.weight": 2, "model.final_norm.weight": 3, "classifier.weight": 3},
}


@pytest.mark.parametrize("family", DEPTHS)
def test_each_layer_learns_at_the_decayed_rate_of_its_depth(family_models, family):
    model = family_models[family]
    optimizer = make_optimizer(model, config(learning_rate=1e-3, layerwise_lr_decay=0.8), torch.device("cpu"))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())

    for name, depth in DEPTHS[family].items():
        assert rate[id(params[name])] == pytest.approx(1e-3 * 0.8 ** (3 - depth)), name
    assert len(rate) == len(params), "every parameter in exactly one group"
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.01}


def test_without_layer_decay_the_optimizer_has_the_two_groups_it_always_had(family_models):
    model = family_models["bert"]
    groups = make_optimizer(model, config(learning_rate=1e-3), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}

    assert [g["lr"] for g in groups] == [1e-3, 1e-3] and [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert [names[id(p)] for p in groups[1]["params"]] == [
        n for n, _ in model.named_parameters() if n.endswith(("bias", "LayerNorm.weight", "norm.weight"))]


# --- the weight average -----------------------------------------------------------------------------------------


def test_the_average_follows_the_ema_formula_step_by_step(family_models, fresh_accelerate_state):
    model = family_models["bert"]
    average = WeightAverage(Accelerator(cpu=True), model, decay=0.9)
    generator = torch.Generator().manual_seed(0)
    expected = None
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
        average.update(model)
        weights = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        expected = weights if expected is None else {n: 0.9 * expected[n] + 0.1 * weights[n] for n in weights}

    got = dict(average.module.named_parameters())
    assert all(torch.allclose(got[n].double(), expected[n], rtol=1e-6, atol=1e-7) for n in expected)
    assert not torch.equal(got["classifier.weight"], model.classifier.weight), "an average, not a copy"


# --- FGM --------------------------------------------------------------------------------------------------------


def test_fgm_moves_the_embeddings_by_epsilon_along_their_gradient_and_puts_them_back_exactly(family_models,
                                                                                            fresh_accelerate_state):
    model = family_models["bert"].train()
    embeddings = model.get_input_embeddings().weight
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3, 7, 8, 3]]), "labels": torch.tensor([1])}
    model.zero_grad()
    model(**batch).loss.backward()
    before, gradient = embeddings.detach().clone(), embeddings.grad.clone()
    moved = []

    def adversarial_loss():
        moved.append(embeddings.detach() - before)
        return model(**batch).loss

    FGM(Accelerator(cpu=True), model, epsilon=0.5).attack(adversarial_loss)

    assert torch.equal(embeddings.detach(), before), "put back bit for bit"
    assert moved[0].norm().item() == pytest.approx(0.5, rel=1e-5)
    assert torch.allclose(moved[0], 0.5 * gradient / gradient.norm(), atol=1e-7)
    assert not torch.equal(embeddings.grad, gradient), "the adversarial backward added its gradient"


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
@pytest.mark.parametrize("option", [{"ema_decay": 0.99}, {"adversarial": "fgm"}])
def test_sharded_engines_refuse_the_recipes_that_need_the_whole_model(engine, option):
    with pytest.raises(UserError, match=rf"--{next(iter(option))} needs the whole model on every process"):
        check_engine(config(**option), engine)
    check_engine(config(**option), DistributedType.MULTI_GPU)  # DDP: every process holds the whole model


# --- bad values -------------------------------------------------------------------------------------------------

BAD = {
    "--label_smoothing -0.1": "--label_smoothing must be in [0, 1), got -0.1",
    "--label_smoothing 1": "--label_smoothing must be in [0, 1), got 1.0",
    "--layerwise_lr_decay 0": "--layerwise_lr_decay must be in (0, 1], got 0.0",
    "--layerwise_lr_decay 1.5": "--layerwise_lr_decay must be in (0, 1], got 1.5",
    "--ema_decay 1": "--ema_decay must be in (0, 1), got 1.0",
    "--ema_decay -0.5": "--ema_decay must be in (0, 1), got -0.5",
    "--adversarial_epsilon 0": "--adversarial_epsilon must be > 0, got 0.0",
    "--rdrop_alpha -1": "--rdrop_alpha must be >= 0, got -1.0",
    "--adversarial pgd": "argument --adversarial: invalid choice: 'pgd'",
    "--class_weights 1,2,3": "--class_weights gives 3 weight(s) for 2 labels ['0', '1']: give one per label",
    "--class_weights 0,1": "--class_weights must be positive finite numbers, got '0,1'",
    "--class_weights a,b": "--class_weights must be 'auto' or one number per label (W0,W1,...), got 'a,b'",
}


@pytest.fixture
def one_label_data(tmp_path) -> dict[str, Path]:
    rows = [r for r in synthetic_pairs(80, seed=4) if r["label"] == "0"]
    return {"train": write_jsonl(tmp_path / "train.json", rows), "dev": write_jsonl(tmp_path / "dev.json", rows)}


@pytest.mark.parametrize("flag", [*BAD, "--class_weights auto"])
def test_bad_values_are_one_line_exit_2_and_nothing_written(flag, tiny_model, one_label_data, tmp_path, capsys,
                                                           fresh_accelerate_state):
    out = tmp_path / "out"
    status = main(["--model_checkpoint", str(tiny_model), "--train_file", str(one_label_data["train"]),
                   "--dev_file", str(one_label_data["dev"]), "--output_dir", str(out), "--do_train", "--cpu",
                   *flag.split()])

    err = capsys.readouterr().err
    expected = BAD.get(flag, f"--class_weights auto: label '1' has no pair in --train_file {one_label_data['train']}")
    assert status == 2
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert not out.exists()


def test_the_clue_recipe_file_is_a_valid_run_with_its_recipes_on(synthetic_data, tmp_path):
    """launch/recipes/afqmc_clue.yaml, with the data and output of this machine on top."""
    cfg = parse_config(["--config", str(ROOT / "launch" / "recipes" / "afqmc_clue.yaml"), "--train_file",
                        str(synthetic_data["train"]), "--dev_file", str(synthetic_data["dev"]), "--test_file",
                        str(synthetic_data["test"]), "--output_dir", str(tmp_path / "out")])

    assert (cfg.layerwise_lr_decay, cfg.ema_decay, cfg.adversarial) == (0.95, 0.999, "fgm")
    assert (cfg.learning_rate, cfg.global_batch_size, cfg.num_train_epochs) == (2e-5, 32, 3)


# --- whole runs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    build_tiny_bert(str(path), vocab=SPECIAL_TOKENS + sorted(set(FILLER + [PLANTED])), hidden_size=64,
                    num_layers=2, num_heads=2, dropout=0.0)
    return path


@pytest.mark.slow
def test_a_weighted_smoothed_loss_is_the_same_on_one_process_and_two(no_dropout_model, tmp_path):
    """203 pairs in global batches of 8: the last batch of each epoch is shared out with padding copies."""
    data = {"train": write_jsonl(tmp_path / "train.json", synthetic_pairs(203, seed=11)),
            "dev": write_jsonl(tmp_path / "dev.json", synthetic_pairs(61, seed=12))}
    runs = {}
    for name, script in (("one", None), ("two", "cpu_debug_2proc.sh")):
        runs[name] = out = tmp_path / name
        result = run_tool(["--model_checkpoint", no_dropout_model, "--train_file", data["train"], "--dev_file",
                           data["dev"], "--output_dir", out, "--do_train", "--global_batch_size", "8",
                           "--learning_rate", "1e-3", "--seed", "3", "--logging_steps", "13", "--num_train_epochs",
                           "1", "--checkpointing_steps", "26", "--class_weights", "0.4,1.6", "--label_smoothing",
                           "0.1"], script=script)
        assert result.returncode == 0, result.stderr[-3000:]

    losses = [[r["train/loss"] for r in read_jsonl(runs[n] / "metrics.jsonl") if "train/loss" in r] for n in runs]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    one, two = (load_file(runs[n] / "checkpoints" / "step_26" / "model.safetensors") for n in ("one", "two"))
    for name in one:
        if "attention.self.key.bias" not in name:  # zero gradient: rounding noise (see test_global_batch.py)
            assert (one[name] - two[name]).abs().max() <= 1e-4 * one[name].abs().max().clamp_min(1e-12), name


def recipe_args(model, data, out, *extra) -> list:
    return ["--model_checkpoint", model, "--train_file", data["train"], "--dev_file", data["dev"], "--output_dir",
            out, "--do_train", "--learning_rate", "1e-3", "--num_train_epochs", "2", "--batch_size", "16",
            "--logging_steps", "5", "--checkpointing_steps", "8", "--seed", "7", "--max_train_samples", "256",
            "--ema_decay", "0.9", "--adversarial", "fgm", "--rdrop_alpha", "2", "--layerwise_lr_decay", "0.9",
            "--class_weights", "auto", "--label_smoothing", "0.1", *extra]


@pytest.mark.slow
def test_a_killed_run_with_every_recipe_on_resumes_bit_for_bit(tiny_model, synthetic_data, tmp_path):
    """EMA (its average is in every checkpoint), FGM and R-Drop (dropout on: their RNG draws continue exactly),
    layer-wise rates and the weighted, smoothed loss: killed after step 8 of 32, resumed, the same run."""
    reference = tmp_path / "reference"
    result = run_tool(recipe_args(tiny_model, synthetic_data, reference))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    run = start_tool(recipe_args(tiny_model, synthetic_data, out))
    while not (out / "checkpoints" / "step_8").exists():
        assert run.poll() is None, run.communicate()[1][-3000:]
    kill_tree(run.pid)
    run.communicate()
    assert (out / "checkpoints" / "step_8" / "custom_checkpoint_0.pkl").exists(), "the average is checkpointed"

    resumed = run_tool(recipe_args(tiny_model, synthetic_data, out, "--resume_from_checkpoint", "latest"))

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    for folder in ("checkpoints/step_32", "best"):
        want, got = (load_file(o / folder / "model.safetensors") for o in (reference, out))
        assert all(torch.equal(want[k], got[k]) for k in want), folder
    assert without_timing(read_jsonl(out / "metrics.jsonl")) == without_timing(read_jsonl(reference / "metrics.jsonl"))
    results = json.loads((reference / "results.json").read_text())
    assert results["best_weights"] == "ema" and results["ema_decay"] == 0.9
    assert 0 < results["fgm_seconds_fraction"] < 1
    counts = Counter(int(r["label"]) for r in read_jsonl(synthetic_data["train"])[:256])
    assert json.loads((reference / "run_config.json").read_text())["class_weight_values"] == pytest.approx(
        [256 / (2 * counts[0]), 256 / (2 * counts[1])])


@pytest.mark.slow
def test_best_holds_the_average_not_the_trained_weights(tiny_model, synthetic_data, tmp_path):
    """One evaluation, at the end: best/ is the average of the final checkpoint, which also holds the trained
    weights (they differ)."""
    out = tmp_path / "out"
    result = run_tool(["--model_checkpoint", tiny_model, "--train_file", synthetic_data["train"], "--dev_file",
                       synthetic_data["dev"], "--output_dir", out, "--do_train", "--learning_rate", "1e-3",
                       "--num_train_epochs", "1", "--batch_size", "32", "--checkpointing_steps", "16",
                       "--ema_decay", "0.8"])
    assert result.returncode == 0, result.stderr[-3000:]
    best = load_file(out / "best" / "model.safetensors")
    trained = load_file(out / "checkpoints" / "step_16" / "model.safetensors")
    average = torch.load(out / "checkpoints" / "step_16" / "custom_checkpoint_0.pkl", weights_only=True)

    assert int(average["n_averaged"]) == 16
    for name, value in best.items():
        assert torch.equal(value, average[f"module.{name}"].float()), name
    assert not torch.equal(best["classifier.weight"], trained["classifier.weight"])
