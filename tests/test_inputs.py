"""`train.py` on inputs that pass a first look and would fail later: each is refused before anything is written,
with one `error:` line naming the file and line (or the flag), exit status 2, and no traceback.

Every case is a real run of the tool; they are started together (a module fixture) to share their start-up time.
The many ways a model folder can be bad are specified in test_model.py; two of them run the whole tool here (and a
cut-short trained model below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import limit, stacks_of, start_tool

from afqmc_dist.config import RunConfig
from afqmc_dist.model import build_model_and_tokenizer

CASES = ["a lone surrogate in the train file", "a lone surrogate in an extra field, --streaming",
         "a 5000-digit label in the dev file", "100k nested lists in the test file",
         "a duplicate id in the predict file", "weights overwritten with random bytes",
         "hidden_size 'abc' in config.json",
         "a local folder that does not exist", "an empty model folder"]


def finish_tool(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    """Wait for a run started with `start_tool` (as `run_tool` does)."""
    try:
        out, err = process.communicate(timeout=limit(timeout))
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s; where each process was:\n{stacks_of(process)}", pytrace=False)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def with_line(source: Path, target: Path, lineno: int, text: str) -> Path:
    """A copy of the JSON-lines file `source` whose line `lineno` is `text` (raw JSON, escapes as written)."""
    lines = source.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = text
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def damaged_copy(model: Path, target: Path, damage: str) -> Path:
    shutil.copytree(model, target)
    weights, config = target / "model.safetensors", target / "config.json"
    if damage == "random weights":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif damage == "hidden_size 'abc'":
        config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": "abc"}))
    return target


def cases(root: Path, model: Path, data: dict[str, Path]) -> dict[str, tuple[list, str]]:
    """name -> (train.py flags, the start of the one error line)."""
    train, dev, test = data["train"], data["dev"], data["test"]

    def flags(name: str, *extra, checkpoint: Path | str = model, train_file: Path = train, dev_file: Path = dev):
        return ["--model_checkpoint", checkpoint, "--train_file", train_file, "--dev_file", dev_file,
                "--output_dir", root / name / "out", "--do_train", "--num_train_epochs", "1", *extra]

    surrogate = with_line(train, root / "surrogate.json", 3, '{"sentence1": "的了\\ud800", "sentence2": "是在", '
                                                              '"label": "1"}')
    extra_field = with_line(train, root / "extra.json", 5, '{"sentence1": "的了", "sentence2": "是在", "label": "0", '
                                                           '"note": "\\udfff"}')
    digits = with_line(dev, root / "digits.json", 2, '{"sentence1": "的了", "sentence2": "是在", "label": '
                                                     + "1" * 5000 + "}")
    nested = with_line(test, root / "nested.json", 4, '{"sentence1": "的了", "sentence2": "是在", "label": "0", "x": '
                                                      + "[" * 100_000 + "}")
    predict = root / "predict.json"
    predict.write_text("".join(json.dumps({"id": i, "sentence1": "的了", "sentence2": "是在"}) + "\n"
                               for i in (0, 1, 1)), encoding="utf-8")
    bad = {damage: damaged_copy(model, root / damage.replace(" ", "-"), damage)
           for damage in ("random weights", "hidden_size 'abc'")}
    (root / "empty").mkdir()
    abc = bad["hidden_size 'abc'"]
    return {
        "a lone surrogate in the train file": (
            flags("surrogate", train_file=surrogate),
            f"error: {surrogate}:3: 'sentence1' holds '\\ud800', a lone UTF-16 surrogate"),
        "a lone surrogate in an extra field, --streaming": (
            flags("streaming", "--streaming", train_file=extra_field),
            f"error: {extra_field}:5: 'note' holds '\\udfff', a lone UTF-16 surrogate"),
        "a 5000-digit label in the dev file": (
            flags("digits", dev_file=digits), f"error: {digits}:2: not valid JSON here (Exceeds the limit (4300 "),
        "100k nested lists in the test file": (
            flags("nested", "--do_test", "--test_file", nested), f"error: {nested}:4: nested too deeply to be read"),
        "a duplicate id in the predict file": (
            flags("ids", "--do_predict", "--predict_file", predict),
            f"error: {predict}:3: id 1 is also the id of line 2; every id must be unique"),
        "weights overwritten with random bytes": (
            flags("random", checkpoint=bad["random weights"]),
            f"error: --model_checkpoint {bad['random weights']}: model.safetensors is damaged or incomplete "),
        "hidden_size 'abc' in config.json": (
            flags("abc", checkpoint=abc),
            (f"error: --model_checkpoint {abc}: cannot load (Validation error for field 'hidden_size': "
             "TypeError: Field 'hidden_size' expected int, got str (value: 'abc'))")),
        "a local folder that does not exist": (
            flags("nope", checkpoint="./models/nope"), "error: --model_checkpoint ./models/nope: no such folder"),
        "an empty model folder": (
            flags("empty", checkpoint=root / "empty"),
            f"error: --model_checkpoint {root / 'empty'}: the folder is empty (no config.json, no weights)"),
    }


@pytest.fixture(scope="module")
def runs(tiny_model, synthetic_data, tmp_path_factory):
    """Every case started at once, then waited for: name -> (CompletedProcess, expected line, its root)."""
    root = tmp_path_factory.mktemp("inputs")
    planned = cases(root, tiny_model, synthetic_data)
    assert list(planned) == CASES
    started = {name: (start_tool(args), error) for name, (args, error) in planned.items()}
    return {name: (finish_tool(process), error, root / name) for name, (process, error) in started.items()}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(runs, name):
    result, error, root = runs[name]
    lines = result.stderr.splitlines()

    assert result.returncode == 2, result.stderr[-3000:]
    assert lines[-1].startswith(error), lines[-1]
    assert [line for line in lines if "error:" in line] == [lines[-1]]
    assert "Traceback" not in result.stderr
    assert not (root / "out").exists(), "the output folder is created only once the inputs are checked"


def test_a_damaged_trained_model_is_refused_before_test_writes_anything(tiny_model, synthetic_data, tmp_path):
    out = tmp_path / "out"
    model, tokenizer = build_model_and_tokenizer(RunConfig(model_checkpoint=str(tiny_model)))
    model.save_pretrained(out / "best")
    tokenizer.save_pretrained(out / "best")
    weights = out / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    result = finish_tool(start_tool(["--output_dir", out, "--test_file", synthetic_data["test"], "--do_test"]))

    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith(
        f"error: {out / 'best'}: cannot load the trained model: model.safetensors is damaged or incomplete (")
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing written, nothing removed"
