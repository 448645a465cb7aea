"""Specification of `parse_config`: tutorial flag names and aliases, YAML/JSON files, and up-front validation."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import limit

from afqmc_dist.arguments import groups, parse_config
from afqmc_dist.config import RunConfig
from afqmc_dist.data import PairSchema, read_pairs
from afqmc_dist.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PAIR = '{"sentence1": "花呗如何还款", "sentence2": "花呗怎么还钱", "label": "1"}\n'


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Existing train/dev/test files (content is not read by the config) and a not-yet-existing output dir."""
    paths = {name: tmp_path / f"{name}.json" for name in ("train", "dev", "test")}
    for path in paths.values():
        path.write_text(PAIR, encoding="utf-8")
    return {**{k: str(v) for k, v in paths.items()}, "output": str(tmp_path / "out"), "root": str(tmp_path)}


def train_args(files, *extra: str) -> list[str]:
    return ["--model_checkpoint", "bert-base-chinese", "--train_file", files["train"], "--dev_file", files["dev"],
            "--output_dir", files["output"], "--do_train", *extra]


def error_of(argv: list[str]) -> str:
    with pytest.raises(UserError) as info:
        parse_config(argv)
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


# --- flags --------------------------------------------------------------------------------------------------


def test_tutorial_flag_names_parse(files):
    cfg = parse_config([
        "--model_checkpoint", "hfl/chinese-roberta-wwm-ext", "--train_file", files["train"],
        "--dev_file", files["dev"], "--test_file", files["test"], "--output_dir", files["output"],
        "--max_seq_length", "64", "--learning_rate", "2e-5", "--num_train_epochs", "5", "--batch_size", "16",
        "--seed", "7", "--warmup_proportion", "0.1", "--weight_decay", "0.05", "--adam_beta1", "0.8",
        "--adam_beta2", "0.98", "--adam_epsilon", "1e-6", "--do_train", "--do_test", "--do_predict",
    ])

    assert (cfg.model_checkpoint, cfg.train_file, cfg.dev_file, cfg.test_file, cfg.output_dir) == (
        "hfl/chinese-roberta-wwm-ext", files["train"], files["dev"], files["test"], files["output"])
    assert (cfg.max_seq_length, cfg.num_train_epochs, cfg.batch_size, cfg.seed) == (64, 5, 16, 7)
    assert (cfg.learning_rate, cfg.warmup_proportion, cfg.weight_decay) == (2e-5, 0.1, 0.05)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.8, 0.98, 1e-6)
    assert isinstance(cfg.learning_rate, float) and isinstance(cfg.batch_size, int)
    assert cfg.do_train and cfg.do_test and cfg.do_predict
    assert cfg.predict_input == files["test"]  # --do_predict defaults to the test file


def test_defaults(files):
    cfg = parse_config(train_args(files))

    assert (cfg.max_seq_length, cfg.learning_rate, cfg.num_train_epochs) == (128, 1e-5, 3)
    assert cfg.label_list == ["0", "1"] and cfg.positive_label == "1"
    assert not (cfg.do_test or cfg.do_predict or cfg.streaming or cfg.overwrite_output_dir)
    plan = cfg.batch_plan(num_processes=2)
    assert (plan.per_device, plan.global_batch) == (4, 8)  # the tutorial's batch of 4, per process
    assert plan.eval_per_device == 64  # eval batches are sorted by length: big ones waste little


@pytest.mark.parametrize(("processes", "accumulation", "per_device"), [(1, 1, 8), (2, 1, 4), (1, 2, 4), (4, 2, 1)])
def test_global_batch_size_fixes_the_step_and_derives_the_per_process_batch(files, processes, accumulation,
                                                                             per_device):
    cfg = parse_config(train_args(files, "--global_batch_size", "8", "--gradient_accumulation_steps",
                                  str(accumulation)))
    plan = cfg.batch_plan(processes)

    assert (plan.global_batch, plan.per_device, plan.micro_batch) == (8, per_device, per_device * processes)
    assert plan.describe() == {"global_batch_size": 8, "per_device_batch_size": per_device,
                               "num_processes": processes, "gradient_accumulation_steps": accumulation}


def test_a_global_batch_that_does_not_split_evenly_is_refused_naming_the_numbers(files):
    cfg = parse_config(train_args(files, "--global_batch_size", "10", "--gradient_accumulation_steps", "3"))

    with pytest.raises(UserError) as info:
        cfg.batch_plan(num_processes=2)
    assert str(info.value) == ("--global_batch_size 10 does not split evenly into 2 process(es) x 3 accumulation "
                               "step(s): use a multiple of 6")


@pytest.mark.parametrize("alias, value, field, expected", [
    ("--model_name_or_path", "bert-base-chinese", "model_checkpoint", "bert-base-chinese"),
    ("--per_device_train_batch_size", "32", "batch_size", 32),
    ("--per_device_eval_batch_size", "64", "eval_batch_size", 64),
    ("--max_length", "96", "max_seq_length", 96),
    ("--warmup_ratio", "0.06", "warmup_proportion", 0.06),
])
def test_modern_hugging_face_names_are_aliases(files, alias, value, field, expected):
    args = train_args(files)
    if alias == "--model_name_or_path":
        args = args[2:]  # drop --model_checkpoint
    cfg = parse_config([*args, alias, value])

    assert getattr(cfg, field) == expected


def test_validation_file_is_an_alias_of_dev_file(files):
    cfg = parse_config(["--model_checkpoint", "m", "--train_file", files["train"], "--validation_file", files["dev"],
                        "--output_dir", files["output"], "--do_train"])

    assert cfg.dev_file == files["dev"]


# --- config files -------------------------------------------------------------------------------------------


def file_options(files) -> dict:
    return {"model_checkpoint": "bert-base-chinese", "train_file": files["train"], "dev_file": files["dev"],
            "test_file": files["test"], "output_dir": files["output"], "do_train": True, "do_predict": True,
            "learning_rate": 3e-5, "batch_size": 16, "label_list": ["0", "1"], "max_train_samples": 100}


def write_yaml(path, options: dict) -> str:
    path.write_text(yaml.safe_dump(options, allow_unicode=True), encoding="utf-8")
    return str(path)


def write_json(path, options: dict) -> str:
    path.write_text(json.dumps(options), encoding="utf-8")
    return str(path)


def test_yaml_file_json_file_and_flags_give_the_same_config(files, tmp_path):
    options = file_options(files)
    yaml_file = write_yaml(tmp_path / "run.yaml", options)
    json_file = write_json(tmp_path / "run.json", options)
    flags = train_args(files, "--test_file", files["test"], "--do_predict", "--learning_rate", "3e-5",
                       "--batch_size", "16", "--max_train_samples", "100")

    from_flags = parse_config(flags).to_dict()

    assert parse_config(["--config", yaml_file]).to_dict() == from_flags
    assert parse_config([yaml_file]).to_dict() == from_flags  # a YAML file as the only argument
    assert parse_config(["--config", json_file]).to_dict() == from_flags
    assert parse_config([json_file]).to_dict() == from_flags
    assert from_flags["learning_rate"] == 3e-5 and from_flags["max_train_samples"] == 100


def test_yml_extension_works_as_the_only_argument(files, tmp_path):
    cfg = parse_config([write_yaml(tmp_path / "run.yml", file_options(files))])

    assert cfg.batch_size == 16


@pytest.mark.parametrize("file_first", [True, False], ids=["--config first", "--config last"])
def test_command_line_flags_override_the_file(files, tmp_path, file_first):
    config = ["--config", write_yaml(tmp_path / "run.yaml", file_options(files))]
    flags = ["--seed", "7", "--learning_rate", "5e-5", "--label_list", "no", "yes", "--positive_label", "yes"]

    cfg = parse_config(config + flags if file_first else flags + config)

    assert (cfg.seed, cfg.learning_rate, cfg.label_list, cfg.positive_label) == (7, 5e-5, ["no", "yes"], "yes")
    assert (cfg.batch_size, cfg.max_train_samples, cfg.train_file) == (16, 100, files["train"])  # from the file


def test_unknown_key_in_file_names_the_key_and_the_file(files, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {**file_options(files), "learning_rat": 1e-5})

    message = error_of([path])

    assert "learning_rat" in message and path in message


def test_yaml_scientific_notation_is_a_float(files, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model_checkpoint: m\ntrain_file: {files['train']}\ndev_file: {files['dev']}\n"
                    f"output_dir: {files['output']}\ndo_train: true\nlearning_rate: 1e-5\nadam_epsilon: 1e-6\n",
                    encoding="utf-8")
    assert yaml.safe_load(path.read_text())["learning_rate"] == "1e-5"  # PyYAML's YAML 1.1 reading

    cfg = parse_config([str(path)])

    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.adam_epsilon == 1e-6 and isinstance(cfg.adam_epsilon, float)


def test_yaml_numeric_labels_become_label_strings(files, tmp_path):
    """`label_list: [0, 1]` is natural YAML for LCQMC-like data; the labels are matched as text."""
    path = tmp_path / "run.yaml"
    path.write_text(f"model_checkpoint: m\ntrain_file: {files['train']}\ndev_file: {files['dev']}\n"
                    f"output_dir: {files['output']}\ndo_train: true\nlabel_list: [0, 1]\npositive_label: 1\n",
                    encoding="utf-8")

    cfg = parse_config([str(path)])

    assert (cfg.label_list, cfg.positive_label) == (["0", "1"], "1")
    assert read_pairs(files["train"], PairSchema.from_config(cfg), require_label=True)[0].label == 1


@pytest.mark.parametrize("key, value", [("head", "bogus"), ("mixed_precision", "fp8"),
                                        ("lr_scheduler_type", "cosine_annealing"), ("batch_size", 8.5),
                                        ("num_train_epochs", "three")])
def test_bad_value_in_file_names_the_key_and_the_file(files, tmp_path, key, value):
    path = write_yaml(tmp_path / "run.yaml", {**file_options(files), key: value})

    message = error_of([path])

    assert key in message and str(value) in message


def test_yaml_booleans_are_not_taken_for_text(files, tmp_path):
    """YAML 1.1 reads unquoted `no` as false: say so rather than run with "False" (or crash in accelerate)."""
    base = (f"model_checkpoint: m\ntrain_file: {files['train']}\ndev_file: {files['dev']}\n"
            f"output_dir: {files['output']}\ndo_train: yes\n")
    unquoted, quoted = tmp_path / "unquoted.yaml", tmp_path / "quoted.yaml"
    unquoted.write_text(base + "mixed_precision: no\n", encoding="utf-8")
    quoted.write_text(base + "mixed_precision: 'no'\n", encoding="utf-8")

    message = error_of([str(unquoted)])

    assert str(unquoted) in message and "mixed_precision" in message and "quote" in message
    assert parse_config([str(quoted)]).mixed_precision == "no"
    assert parse_config([str(quoted)]).do_train is True  # where a boolean is wanted, yes is fine


def test_missing_config_file_is_an_error(tmp_path):
    path = str(tmp_path / "nope.yaml")

    assert error_of(["--config", path]) == f"--config {path}: no such file"


def test_malformed_yaml_is_a_one_line_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("do_train: [true\nseed: 1\n", encoding="utf-8")

    message = error_of([str(path)])

    assert message.startswith(f"{path}: not valid YAML")


# --- validation ---------------------------------------------------------------------------------------------


def without(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2:]


VALIDATION_ERRORS = {
    "nothing to do": (lambda f: [a for a in train_args(f) if a != "--do_train"], ["nothing to do", "--do_train"]),
    "missing --output_dir": (lambda f: without(train_args(f), "--output_dir"), ["--output_dir"]),
    "--do_train without --train_file": (lambda f: without(train_args(f), "--train_file"), ["--train_file"]),
    "--do_test without --test_file": (lambda f: ["--output_dir", f["output"], "--do_test"], ["--test_file"]),
    "--dev_file does not exist": (lambda f: without(train_args(f), "--dev_file") + ["--dev_file", f["root"] + "/x"],
                                  ["--dev_file", "/x", "no such file"]),
    "--learning_rate 0": (lambda f: train_args(f, "--learning_rate", "0"), ["--learning_rate"]),
    "--batch_size -1": (lambda f: train_args(f, "--batch_size", "-1"), ["--batch_size"]),
    "--global_batch_size 0": (lambda f: train_args(f, "--global_batch_size", "0"), ["--global_batch_size"]),
    "both batch sizes": (lambda f: train_args(f, "--batch_size", "4", "--global_batch_size", "8"),
                         ["--batch_size", "--global_batch_size", "not both"]),
    "--length_group_size 0": (lambda f: train_args(f, "--length_group_size", "0"), ["--length_group_size"]),
    "--warmup_proportion 1.5": (lambda f: train_args(f, "--warmup_proportion", "1.5"), ["--warmup_proportion"]),
    "--positive_label not in --label_list": (lambda f: train_args(f, "--positive_label", "2"),
                                             ["--positive_label", "'2'", "--label_list"]),
    "unknown flag": (lambda f: train_args(f, "--lr", "1e-5"), ["unknown option --lr"]),
    "non-numeric value": (lambda f: train_args(f, "--learning_rate", "abc"), ["--learning_rate", "abc"]),
    "invalid choice": (lambda f: train_args(f, "--head", "pooler"), ["--head", "pooler"]),
    "a negative learning rate": (lambda f: train_args(f, "--learning_rate", "-1e-3"),
                                 ["--learning_rate must be > 0, got -0.001"]),
    "an infinite learning rate": (lambda f: train_args(f, "--learning_rate", "inf"),
                                  ["--learning_rate must be a finite number, got inf"]),
    "a negative seed": (lambda f: train_args(f, "--seed", "-1"),
                        ["--seed must be a whole number from 0 to 4294967295"]),
    "a seed beyond numpy's": (lambda f: train_args(f, "--seed", "99999999999999999999"), ["--seed", "got 9999"]),
    "a folder as --train_file": (lambda f: without(train_args(f), "--train_file") + ["--train_file", f["root"]],
                                 ["--train_file", "is a folder, not a file"]),
    "--do_predict without a file": (lambda f: ["--output_dir", f["output"], "--do_predict"],
                                    ["--predict_file (or --test_file) is required with --do_predict"]),
    "--warmup_steps with --warmup_proportion": (lambda f: train_args(f, "--warmup_steps", "5", "--warmup_proportion",
                                                                     "0.1"), ["--warmup_steps", "not with it"]),
    "--max_steps 0": (lambda f: train_args(f, "--max_steps", "0"), ["--max_steps must be > 0"]),
    "an unknown tracker": (lambda f: train_args(f, "--report_to", "tensorbored"), ["--report_to 'tensorbored'"]),
    "a task name that is a path": (lambda f: train_args(f, "--task_name", "../x"), ["--task_name"]),
}


@pytest.mark.parametrize("make_args, fragments", VALIDATION_ERRORS.values(), ids=VALIDATION_ERRORS.keys())
def test_validation_error_names_the_flag(files, make_args, fragments):
    message = error_of(make_args(files))

    for fragment in fragments:
        assert fragment in message


def test_non_empty_output_dir_needs_overwrite_output_dir(files, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")

    message = error_of(train_args(files))
    cfg = parse_config(train_args(files, "--overwrite_output_dir"))

    assert "--output_dir" in message and "--overwrite_output_dir" in message
    assert cfg.overwrite_output_dir
    assert parse_config(["--test_file", files["test"], "--output_dir", files["output"], "--do_test"]).do_test


def test_empty_existing_output_dir_is_fine(files, tmp_path):
    (tmp_path / "out").mkdir()

    assert parse_config(train_args(files)).output_dir == files["output"]


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(RunConfig))


def test_an_output_dir_that_cannot_be_created_is_refused_up_front(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"--output_dir .*/out cannot be created: .*a-file is not a writable folder"):
        parse_config(["--do_predict", "--test_file", str(blocker), "--output_dir", str(blocker / "out")])


def test_a_read_only_output_dir_is_named_as_not_writable():
    """Checked as an unprivileged user (root may write into a read-only folder): `setpriv` drops to nobody."""
    folder = Path(tempfile.mkdtemp(prefix="afqmc-read-only-"))
    folder.chmod(0o755)
    (folder / "test.json").write_text(PAIR, encoding="utf-8")
    (folder / "test.json").chmod(0o644)
    out = folder / "out"
    out.mkdir(mode=0o555)
    code = ("import sys; from afqmc_dist.arguments import parse_config\n"
            "try:\n    parse_config(sys.argv[1:])\nexcept Exception as e:\n    print(e)")
    command = [sys.executable, "-c", code, "--do_test", "--test_file", str(folder / "test.json"), "--output_dir",
               str(out)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot check as an unprivileged user")
        command = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *command]
        probe = subprocess.run([*command[:6], sys.executable, "-c", "import afqmc_dist"], cwd=ROOT,
                               capture_output=True, text=True, timeout=limit(60))
        if probe.returncode != 0:  # an interpreter in root's home (pyenv in /root, mode 700), say
            pytest.skip(f"an unprivileged user cannot run {sys.executable}: {probe.stderr.strip()[-200:]}")
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit(60))
    finally:
        out.chmod(0o755)
        shutil.rmtree(folder)

    assert result.stdout.strip() == f"--output_dir {out} is not writable", result.stderr[-2000:]


def test_the_run_lock_files_left_in_a_folder_do_not_make_it_a_used_folder(files, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".afqmc.lock").write_text("")

    assert parse_config(train_args(files)).output_dir == files["output"]


# --- typos, switches and --help -------------------------------------------------------------------------------


def test_a_mistyped_flag_names_the_closest_option(files):
    assert error_of(train_args(files, "--learning_rat", "1e-3")) == \
        "unknown option --learning_rat (did you mean --learning_rate?) (see --help)"


def test_a_mistyped_config_key_names_the_closest_option(files, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {**file_options(files), "num_train_epoch": 2})

    assert error_of([path]) == f"{path}: unknown option 'num_train_epoch' (did you mean num_train_epochs?)"


def test_booleans_are_plain_switches_and_true_in_a_config_file(files, tmp_path):
    from_flags = parse_config(train_args(files, "--no_group_by_length", "--streaming"))
    path = write_yaml(tmp_path / "run.yaml", {**file_options(files), "do_train": True, "group_by_length": False,
                                              "streaming": "true"})
    from_file = parse_config([path])

    assert (from_flags.do_train, from_flags.group_by_length, from_flags.streaming) == (True, False, True)
    assert (from_file.do_train, from_file.group_by_length, from_file.streaming) == (True, False, True)
    assert "unexpected argument 'true'" in error_of(train_args(files, "--streaming", "true"))


def test_tf32_is_decided_by_the_device_unless_a_switch_says(files):
    assert parse_config(train_args(files)).tf32 is None
    assert parse_config(train_args(files, "--tf32")).tf32 is True
    assert parse_config(train_args(files, "--no_tf32")).tf32 is False


def test_report_to_takes_a_list_comma_or_space_separated_and_all():
    cfg = RunConfig(report_to=["tensorboard,mlflow", "wandb", "none"])
    assert cfg.trackers == ["tensorboard", "mlflow", "wandb"]
    assert RunConfig(report_to=["all"]).trackers == ["wandb", "tensorboard", "mlflow"]
    assert RunConfig().trackers == []


def test_help_groups_the_options_states_each_default_once_and_keeps_the_examples_as_lines(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"])
    text = capsys.readouterr().out

    assert exit_info.value.code == 0
    headings = [line[:-1] for line in text.splitlines() if line.endswith("options:") and line != "options:"]
    assert headings == [f"{title} options" for title in groups()]
    assert "[DO_TRAIN]" not in text and "  --do_train  " in text.replace("\n", "  ")
    batch = text[text.index("  --batch_size"):text.index("  --gradient_accumulation_steps")]
    assert batch.count("default") == 1, batch
    assert "(default: None)" not in text
    examples = text[text.index("examples:"):]
    assert "\n  python train.py run.yaml " in examples and "\n  python train.py --config run.yaml --seed 7" in examples


def test_every_option_is_in_exactly_one_help_group():
    grouped = [name for names in groups().values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(RunConfig))
