"""The steps of `bench/gpu_check.sh` on one device, in the order they run (the 2-GPU steps: gpu_steps_multi.py).

Every run trains the tiny model built on the spot (`python -m afqmc_dist.tiny_model`, hidden 128, 2 layers,
vocabulary from the sample data) on the bundled sample data (240 training pairs: 15 steps of 16 per epoch), as a
user would: through the launch scripts (`launch/single_gpu.sh` on a GPU, `launch/cpu_debug.sh` on a CPU,
`launch/sharded.sh` for FSDP2) and `python -m afqmc_dist.predict`. Each step checks what the tool promises and
returns its numbers for the report; `Failed` says what was wrong, `Skipped` why it could not run.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from pathlib import Path

from afqmc_dist.launcher import free_port
from bench.common import REPO, read_jsonl
from bench.gpu_check.checking import Check, Failed, Skipped, Steps
from bench.gpu_check.limits import BASIS, CPU

SAMPLE = REPO / "afqmc_dist" / "sample_data"
DATA = {"train": SAMPLE / "train.json", "dev": SAMPLE / "dev.json", "test": SAMPLE / "test.json"}
BATCH = 16
CHECKPOINT_EVERY = 10

steps = Steps()


def count_lines(path: Path) -> int:
    return len(read_jsonl(path))


def steps_per_epoch() -> int:
    return math.ceil(count_lines(DATA["train"]) / BATCH)


def tiny_model(check: Check, dropout: float = 0.1) -> Path:
    """The tiny model folder (built once per dropout value)."""
    key = f"model-dropout-{dropout}"
    if key not in check.shared:
        path = check.work / f"tiny-bert-dropout-{dropout}"
        done = check.command([sys.executable, "-m", "afqmc_dist.tiny_model", "--output_dir", path,
                              "--dropout", dropout], timeout=120)
        check.expect(done, 0, "python -m afqmc_dist.tiny_model")
        check.shared[key] = path
    return check.shared[key]


def run_args(check: Check, out: Path, epochs: int, *extra, model: Path | None = None) -> list:
    """train.py flags: train, test and predict the sample data with the tiny model."""
    batch = ["--batch_size", BATCH] if "--global_batch_size" not in extra else []
    return ["--model_checkpoint", model or tiny_model(check), "--train_file", DATA["train"],
            "--dev_file", DATA["dev"], "--test_file", DATA["test"], "--output_dir", out, "--do_train", "--do_test",
            "--do_predict", "--num_train_epochs", epochs, *batch, "--learning_rate", "2e-3", "--logging_steps", "5",
            "--seed", "1", *extra]


def one_process(check: Check, args: list) -> list:
    """One process on the GPU (launch/single_gpu.sh), or on the CPU (launch/cpu_debug.sh)."""
    return ["bash", "launch/single_gpu.sh" if check.cuda else "launch/cpu_debug.sh", *args]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Failed(f"{path.name}: cannot be read ({e})") from None


def checkpoints(out: Path) -> list[tuple[int, str | None]]:
    """(step, why it is not usable or None) of every checkpoint of OUTPUT_DIR, oldest first: the tool's own test
    of a complete checkpoint (files, sizes and checksums against its manifest, a readable train_state.json)."""
    from afqmc_dist.checkpoints import checkpoint_problem, list_checkpoints

    return [(int(Path(path).name.split("_")[1]), checkpoint_problem(path)) for path in list_checkpoints(str(out))]


def latest_usable(out: Path) -> int | None:
    usable = [number for number, problem in checkpoints(out) if problem is None]
    return usable[-1] if usable else None


def metric_steps(out: Path, prefix: str = "train/") -> list[int]:
    """The steps of OUTPUT_DIR/metrics.jsonl's records with keys starting with `prefix` ("train/": training
    windows, "dev/": evaluations). Safe to call while the run writes (a line being written is not read)."""
    try:
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if any(key.startswith(prefix) for key in record):
            steps.append(record["step"])
    return steps


def ran_on(output: str) -> str | None:
    """The device the tool reported at start ("N process(es), device cuda, ..."), if it did."""
    found = re.findall(r"process\(es\), device (\w+)", output)
    return found[-1] if found else None


def verify_run(check: Check, out: Path, output: str, total_steps: int, saved_every: bool = True) -> dict:
    """A finished train + test + predict run: best model, results, test and predictions complete, trained to
    `total_steps`, on the expected device, and (with `saved_every`) every checkpoint usable up to the last step."""
    results = read_json(out / "results.json")
    if not (out / "best" / "model.safetensors").is_file():
        raise Failed(f"{out.name}: no best/model.safetensors")
    tests = read_json(out / "test_results.json")
    if tests.get("test_count") != count_lines(DATA["test"]):
        raise Failed(f"test_results.json counts {tests.get('test_count')} pairs, the test file has "
                     f"{count_lines(DATA['test'])}")
    predicted = len(read_jsonl(out / "predictions.jsonl")) if (out / "predictions.jsonl").exists() else 0
    if predicted != count_lines(DATA["test"]):
        raise Failed(f"predictions.jsonl has {predicted} lines for {count_lines(DATA['test'])} test pairs")
    trained = max(metric_steps(out, "dev/"), default=0)
    if trained != total_steps:
        raise Failed(f"the last evaluation is at step {trained}, expected {total_steps}")
    device = ran_on(output)
    if device and device != ("cuda" if check.cuda else "cpu"):
        raise Failed(f"the tool ran on {device}")
    numbers = {"device": device, "best_step": results.get("best_step"), "dev_accuracy": results.get("dev_accuracy"),
               "test_accuracy": tests.get("test_accuracy"),
               "train_samples_per_second": results.get("train_samples_per_second")}
    if saved_every:
        found = checkpoints(out)
        bad = [f"step_{n}: {problem}" for n, problem in found if problem]
        if bad or not found or found[-1][0] != total_steps:
            raise Failed(f"checkpoints: {bad or [n for n, _ in found]} (expected usable ones up to step {total_steps})")
        numbers["checkpoints"] = [n for n, _ in found]
    return numbers


# ---------------------------------------------------------------------------------------------------- the steps

def pytest_step(check: Check, selection: list[str], tag: str) -> dict:
    """Run `pytest -m gpu SELECTION`; passed when it passes with at least one test run."""
    from xml.etree import ElementTree

    xml = check.work / f"{tag}.xml"
    done = check.command([sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "-p", "no:cacheprovider",
                          f"--junitxml={xml}", *selection])
    if done.timed_out:
        raise Failed("pytest was still running at the step's time limit (killed)")
    if done.returncode == 5:
        raise Skipped(f"no test collected by pytest -m gpu {' '.join(selection)}")
    cases = ElementTree.parse(xml).getroot().iter("testcase") if xml.exists() else []
    outcome = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome["failed" if kind in ("failure", "error") else kind].append(name)
    numbers = {"tests_" + k: len(v) for k, v in outcome.items()} | {"failed_tests": outcome["failed"]}
    if done.returncode != 0:
        raise Failed(f"pytest exit status {done.returncode}: {len(outcome['failed'])} failed "
                     f"({', '.join(outcome['failed'][:5]) or done.last_line()})", numbers)
    if not outcome["passed"]:
        raise Skipped(f"every collected test was skipped ({len(outcome['skipped'])})")
    return numbers


@steps.add("gpu_tests", "gpu", "pytest -m gpu tests (the fp16 overflow tests run in fp16_overflow)",
           part=1, cpu_seconds=CPU["gpu_tests"], basis=BASIS["gpu_tests"], processes=3)
def gpu_tests(check: Check) -> dict:
    return pytest_step(check, ["tests", "-k", "not overflow"], "gpu_tests")


def train_precision(check: Check, precision: str) -> dict:
    out = check.work / f"train_{precision}"
    extra = ["--checkpointing_steps", CHECKPOINT_EVERY] + (["--mixed_precision", precision] if precision != "fp32"
                                                            else [])
    done = check.command(one_process(check, run_args(check, out, 2, *extra)))
    check.expect(done, 0, "train + test + predict")
    numbers = verify_run(check, out, done.output, 2 * steps_per_epoch())
    recorded = read_json(out / "run_config.json").get("mixed_precision")
    if recorded != {"fp32": "no"}.get(precision, precision):
        raise Failed(f"run_config.json records mixed_precision {recorded!r}")
    if precision == "fp16" and not (out / "checkpoints" / f"step_{numbers['checkpoints'][-1]}" / "scaler.pt").exists():
        raise Failed("the fp16 checkpoint has no scaler.pt: a resumed run would restart its loss scale")
    check.shared[f"train_{precision}"] = out
    return {**numbers, "seconds_with_start_up": round(done.seconds, 1)}


@steps.add("train_fp32", "any", "train/test/predict in fp32 with checkpoints (on the CPU where there is no GPU)",
           part=1, cpu_seconds=CPU["train_fp32"], basis=BASIS["train_fp32"])
def train_fp32(check: Check) -> dict:
    return train_precision(check, "fp32")


@steps.add("train_bf16", "gpu", "train/test/predict in bf16 on one GPU with checkpoints",
           part=1, cpu_seconds=CPU["train_fp32"], basis=BASIS["train_bf16"])
def train_bf16(check: Check) -> dict:
    return train_precision(check, "bf16")


@steps.add("train_fp16", "gpu", "train/test/predict in fp16 on one GPU with checkpoints (grad scaler saved)",
           part=1, cpu_seconds=CPU["train_fp32"], basis=BASIS["train_fp16"])
def train_fp16(check: Check) -> dict:
    return train_precision(check, "fp16")


def label1_probability(row: dict) -> float:
    return row["pred_prob"] if row["pred_label"] == "1" else 1.0 - row["pred_prob"]


def compare_predictions(reference: list[dict], other: list[dict], what: str, limit: float) -> dict:
    """Two predictions.jsonl of the same inputs: Failed if a confident label changed (a pair near 50/50 may flip
    on rounding; one predicted with 52% or more must not) or a probability moved by more than `limit`."""
    pairs = list(zip(reference, other))
    if len(reference) != len(other) or not pairs:
        raise Failed(f"{what}: {len(reference)} and {len(other)} predictions")
    diffs = [abs(label1_probability(a) - label1_probability(b)) for a, b in pairs]
    flipped = [i for i, (a, b) in enumerate(pairs) if a["pred_label"] != b["pred_label"] and a["pred_prob"] >= 0.52]
    numbers = {"pairs": len(pairs), "same_label": sum(a["pred_label"] == b["pred_label"] for a, b in pairs),
               "max_probability_difference": max(diffs)}
    if flipped or max(diffs) > limit:
        raise Failed(f"{what}: {len(flipped)} confident label(s) changed, probabilities up to {max(diffs):.2e} "
                     f"apart (limit {limit})", numbers)
    return numbers


@steps.add("bf16_predictions_match_fp32", "any",
           "python -m afqmc_dist.predict with train_fp32's best/ in fp32 and in bf16: same labels, close probabilities",
           part=1, cpu_seconds=CPU["bf16_predictions_match_fp32"], basis=BASIS["bf16_predictions_match_fp32"],
           processes=2)
def bf16_predictions_match_fp32(check: Check) -> dict:
    trained = check.earlier("train_fp32", "best/")
    preds = {}
    for precision in ("no", "bf16"):
        path = check.work / f"predict-{precision}.jsonl"
        done = check.command([sys.executable, "-m", "afqmc_dist.predict", "--model", trained / "best", "--input",
                              DATA["test"], "--output", path], env={"ACCELERATE_MIXED_PRECISION": precision})
        check.expect(done, 0, f"predict ({precision})")
        preds[precision] = read_jsonl(path)
    numbers = compare_predictions(preds["no"], preds["bf16"], "bf16 against fp32", limit=0.02)
    if numbers["max_probability_difference"] == 0:
        raise Failed("bf16 probabilities equal fp32's to the last digit: bf16 was not applied", numbers)
    return numbers


@steps.add("fp16_overflow", "gpu",
           "pytest -m gpu tests/test_engines.py -k overflow: an fp16 loss-scale overflow with and without "
           "--skip_nonfinite_loss", part=1, cpu_seconds=CPU["fp16_overflow"], basis=BASIS["fp16_overflow"])
def fp16_overflow(check: Check) -> dict:
    if not (REPO / "tests" / "test_engines.py").exists():
        raise Skipped("no test collected: tests/test_engines.py does not exist")
    return pytest_step(check, ["tests/test_engines.py", "-k", "overflow"], "fp16_overflow")


def compare_weights(a: Path, b: Path) -> dict:
    """Largest difference between two safetensors files, relative to each tensor's largest value; attention key
    biases left out (their gradient is mathematically zero: they hold rounding noise, see tests/test_global_batch)."""
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    if left.keys() != right.keys():
        raise Failed(f"{a} and {b} hold different tensors")
    identical = all(torch.equal(left[k], right[k]) for k in left)
    compared = [k for k in left if not k.endswith("attention.self.key.bias")]
    worst = max(compared, key=lambda k: float((left[k].float() - right[k].float()).abs().max()
                                              / left[k].float().abs().max().clamp_min(1e-12)))
    relative = float((left[worst].float() - right[worst].float()).abs().max()
                     / left[worst].float().abs().max().clamp_min(1e-12))
    return {"bit_identical": identical, "max_relative_difference": relative, "worst_tensor": worst}


@steps.add("fsdp2_kill_resume", "gpu",
           "FSDP2 on one GPU (launch/sharded.sh, 1 process) with --do_test --do_predict; SIGKILL, resume latest: "
           "best/ equals an uninterrupted run's", part=2, cpu_seconds=CPU["fsdp2_kill_resume"],
           basis=BASIS["fsdp2_kill_resume"], processes=3)
def fsdp2_kill_resume(check: Check) -> dict:
    env = {"NPROC": "1", "ENGINE": "fsdp", "MIXED_PRECISION": "no"}
    epochs, total = 4, 4 * steps_per_epoch()  # 60 steps: time to be killed after the first checkpoint

    def args(out: Path, *extra) -> list:
        return ["bash", "launch/sharded.sh", *run_args(check, out, epochs, "--global_batch_size", BATCH,
                                                       "--checkpointing_steps", CHECKPOINT_EVERY, *extra)]

    reference, killed = check.work / "fsdp-reference", check.work / "fsdp-killed"
    done = check.command(args(reference), env={**env, "MAIN_PROCESS_PORT": str(free_port())})
    check.expect(done, 0, "uninterrupted FSDP2 run")
    numbers = {"reference": verify_run(check, reference, done.output, total)}
    running = check.start(args(killed), env={**env, "MAIN_PROCESS_PORT": str(free_port())})
    if not running.wait_until(lambda: latest_usable(killed) is not None, timeout=120):
        running.kill()
        raise Failed(f"no usable checkpoint appeared before the run ended ({running.wait(10).last_line()})")
    running.kill()
    ended = running.wait(30)
    if ended.returncode == 0 or (killed / "test_results.json").exists():
        raise Failed("the run finished before it could be killed: make it longer")
    numbers["killed_after_step"] = latest_usable(killed)
    done = check.command(args(killed, "--resume_from_checkpoint", "latest"),
                         env={**env, "MAIN_PROCESS_PORT": str(free_port())})
    check.expect(done, 0, "resumed FSDP2 run")
    numbers["resumed"] = verify_run(check, killed, done.output, total)
    numbers["best_weights"] = compare_weights(reference / "best" / "model.safetensors",
                                              killed / "best" / "model.safetensors")
    numbers["predictions"] = compare_predictions(read_jsonl(reference / "predictions.jsonl"),
                                                 read_jsonl(killed / "predictions.jsonl"), "resumed vs uninterrupted",
                                                 limit=1e-3)
    # Not bit-exact on a GPU: the attention backward (SDPA) accumulates with atomics. Rounding noise stays far
    # below what a wrong resume does (a skipped or repeated batch, lost optimizer state: O(1e-1) relative).
    if numbers["best_weights"]["max_relative_difference"] > 1e-2:
        raise Failed(f"the resumed run's best/ differs from the uninterrupted run's: {numbers['best_weights']}",
                     numbers)
    return numbers


@steps.add("sigterm_resume", "any",
           "SIGTERM to the launcher mid-run: exit 3 and a complete checkpoint; --resume_from_checkpoint latest "
           "continues", part=2, cpu_seconds=CPU["sigterm_resume"], basis=BASIS["sigterm_resume"], processes=2)
def sigterm_resume(check: Check) -> dict:
    # Long enough on a GPU for the signal to land mid-run; a CPU is slow enough with 2 epochs.
    epochs = 20 if check.cuda else 2
    total = epochs * steps_per_epoch()
    out = check.work / "sigterm"
    running = check.start(one_process(check, run_args(check, out, epochs)))
    if not running.wait_until(lambda: bool(metric_steps(out)), timeout=120):
        running.kill()
        raise Failed(f"no training step was logged before the run ended ({running.wait(10).last_line()})")
    running.signal(signal.SIGTERM)
    stopped = running.wait(90)
    check.expect(stopped, 3, "the run after SIGTERM")
    step_saved = latest_usable(out)
    if step_saved is None or step_saved >= total:
        raise Failed(f"after SIGTERM: checkpoints {checkpoints(out)}, expected a usable one before step {total}")
    done = check.command(one_process(check, run_args(check, out, epochs, "--resume_from_checkpoint", "latest")))
    check.expect(done, 0, "the resumed run")
    if "starting afresh" in done.output:
        raise Failed("the resumed run started afresh instead of continuing")
    numbers = verify_run(check, out, done.output, total, saved_every=False)
    logged = metric_steps(out)
    if logged != sorted(set(logged)):
        raise Failed(f"metrics.jsonl repeats training steps after the resume: {logged}")
    return {"stopped_after_step": step_saved, "total_steps": total, "exit_status_after_sigterm": stopped.returncode,
            **numbers}
