"""Ensembles in predict (ensemble.py): several --model folders, or a folder listing its members, predict with the
mean of the members' probabilities; members that cannot be averaged are refused in one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import read_jsonl, run_tool, synthetic_pairs, train_args, write_jsonl

from afqmc_dist.predict import main


@pytest.fixture(scope="module")
def second_run(tiny_model, synthetic_data, tmp_path_factory):
    """A second model of the synthetic task: another seed, fewer epochs (its predictions differ)."""
    out = tmp_path_factory.mktemp("second") / "out"
    result = run_tool(train_args(tiny_model, synthetic_data, out, "--seed", "11", "--num_train_epochs", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = [{"id": f"p{i}", "sentence1": r["sentence1"], "sentence2": r["sentence2"]}
            for i, r in enumerate(synthetic_pairs(40, seed=21))]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.json", rows)


def predicted(models: list, pairs, output) -> list[dict]:
    status = main(["--model", *map(str, models), "--input", str(pairs), "--output", str(output), "--cpu"])
    assert status == 0
    return read_jsonl(output)


def probability_of_1(record: dict) -> float:
    return record["pred_prob"] if record["pred_label"] == "1" else 1 - record["pred_prob"]


def test_an_ensembles_probabilities_are_the_mean_of_its_members(trained_run, second_run, pairs, tmp_path,
                                                                fresh_accelerate_state):
    first, second = trained_run[0] / "best", second_run / "best"
    alone = [predicted([m], pairs, tmp_path / f"{i}.jsonl") for i, m in enumerate((first, second))]
    together = predicted([first, second], pairs, tmp_path / "ensemble" / "preds.jsonl")

    assert [probability_of_1(a) for a in alone[0]] != [probability_of_1(b) for b in alone[1]], "members differ"
    for a, b, e in zip(*alone, together, strict=True):
        assert probability_of_1(e) == pytest.approx((probability_of_1(a) + probability_of_1(b)) / 2, abs=2e-6)
        assert e["pred_label"] == ("1" if probability_of_1(e) > 0.5 else "0")
    clue = read_jsonl(tmp_path / "ensemble" / "afqmc_predict.json")
    assert clue == [{"id": e["id"], "label": e["pred_label"]} for e in together], "the CLUE file is the ensemble's"


def test_a_folder_listing_its_members_is_that_ensemble(trained_run, second_run, pairs, tmp_path,
                                                       fresh_accelerate_state):
    """What python -m afqmc_dist.kfold writes: ensemble.json, member paths relative to the folder."""
    folder = tmp_path / "kfold"
    for i, run in enumerate((trained_run[0], second_run)):
        shutil.copytree(run / "best", folder / f"fold-{i}" / "best")
    (folder / "ensemble.json").write_text(json.dumps({"kind": "kfold", "members": ["fold-0/best", "fold-1/best"]}))

    listed = predicted([folder], pairs, tmp_path / "listed.jsonl")
    given = predicted([trained_run[0] / "best", second_run / "best"], pairs, tmp_path / "given.jsonl")

    assert listed == given


def test_members_with_other_labels_or_given_twice_are_refused_in_one_line(trained_run, pairs, tmp_path, capsys,
                                                                          fresh_accelerate_state):
    best = trained_run[0] / "best"
    other = tmp_path / "other"
    shutil.copytree(best, other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "no", "1": "yes"}, {"no": 0, "yes": 1}
    (other / "config.json").write_text(json.dumps(config))
    cases = {(str(best), str(other)): f"error: --model {other} predicts labels ['no', 'yes'], {best} ['0', '1']: "
                                      "an ensemble's members must share their labels",
             (str(best), str(best)): f"error: --model {best} is given twice; an ensemble's members must differ"}

    for models, error in cases.items():
        status = main(["--model", *models, "--input", str(pairs), "--output", str(tmp_path / "out" / "p.jsonl")])
        err = capsys.readouterr().err
        assert status == 2 and err == error + "\n", err
        assert sorted(os.listdir(tmp_path)) == ["other"], "nothing written"


def test_a_pair_after_several_models_is_predicted_by_their_ensemble(trained_run, second_run, pairs, tmp_path, capsys,
                                                                    fresh_accelerate_state):
    """`--model A B S1 S2`: the two values that are not folders are the pair."""
    models = [str(trained_run[0] / "best"), str(second_run / "best")]
    line = predicted(models, pairs, tmp_path / "preds.jsonl")[0]
    capsys.readouterr()

    assert main(["--model", *models, line["sentence1"], line["sentence2"], "--cpu"]) == 0

    assert capsys.readouterr().out == f"{line['pred_label']}\t{line['pred_prob']:.6f}\n"
