"""The Trainer rows: transformers.Trainer with its best settings for this job.

Pre-tokenised pairs, DataCollatorWithPadding, `train_sampling_strategy="group_by_length"` (trainer_grouped; the
transformers 5 name of `group_by_length=True`, which older releases take instead) or "random" (trainer_random, the
Trainer's default), its default optimizer (adamw_torch_fused), no saving, logging or reporting;
`trainer.evaluate` / `trainer.predict` at the eval batch size (default 64 = the tool's default). The Trainer runs
on the row's device: `use_cpu=True` on a CPU, `use_cpu=False` on a GPU (it then puts the model on cuda:0);
`bf16=True` for bf16 (autocast, fp32 master weights, as the other rows). In transformers 5 group_by_length also
orders eval and predict batches by length, so trainer.predict returns its rows out of input order.

Run by `bench/throughput.py` in a child process: `worker_trainer(spec) -> dict` of counts and seconds.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

from bench.common import RowFailed, accuracy_f1, read_jsonl, seed_everything
from bench.measure import Memory, row_record, strict_fp32, synchronize

TRAINER_EVAL_BATCH = 64  # the tool's default eval batch; the Trainer's own default (8) would handicap it


def encode_pairs(path: str, tokenizer, max_length: int, with_labels: bool) -> list[dict]:
    """Pre-tokenised pairs (no padding), one dict of lists per pair, as DataCollatorWithPadding expects."""
    rows = read_jsonl(path)
    encoded = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True,
                        max_length=max_length)
    items = [{key: encoded[key][i] for key in encoded} for i in range(len(rows))]
    if with_labels:
        for item, row in zip(items, rows):
            item["labels"] = int(row["label"])
    return items


class CountingCollator:
    """Wraps a collator and counts the real and padded tokens of the batches it makes."""

    def __init__(self, collator):
        self.collator = collator
        self.real_tokens = self.all_tokens = self.samples = 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.real_tokens += int(mask.sum())
        self.all_tokens += mask.numel()
        self.samples += mask.shape[0]
        return batch


def make_step_clock(device: str):
    """A TrainerCallback timing the training steps: from on_train_begin (everything set up) to on_train_end,
    after the last optimizer step's work has finished on the device (synchronised there, not after every step:
    a sync per step would slow the Trainer down)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        start = end = None
        steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.end = time.perf_counter()

    return StepClock()


def trainer_metrics(eval_pred) -> dict:
    preds = eval_pred.predictions.argmax(-1).tolist()
    accuracy, f1 = accuracy_f1(preds, eval_pred.label_ids.tolist())
    return {"accuracy": accuracy, "f1": f1}


def sampling_arguments(training_arguments_class, sampling: str) -> dict:
    """The TrainingArguments keywords for `sampling` ("group_by_length" or "random") in this transformers:
    `train_sampling_strategy` where it exists, else the older `group_by_length` flag."""
    names = {f.name for f in dataclasses.fields(training_arguments_class)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": sampling}
    return {"group_by_length": sampling == "group_by_length"}


def worker_trainer(spec: dict) -> dict:
    import torch

    try:
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    except ImportError as e:
        raise RowFailed(f"transformers.Trainer is not importable ({e})") from None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = spec["device"]
    torch.set_num_threads(spec["threads"])
    strict_fp32()
    memory = Memory(device).start()
    seed_everything(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2)
    max_length = spec["max_seq_length"]
    train_set = encode_pairs(spec["train_file"], tokenizer, max_length, with_labels=True)
    dev_set = encode_pairs(spec["dev_file"], tokenizer, max_length, with_labels=True)
    predict_set = encode_pairs(spec["predict_file"], tokenizer, max_length, with_labels=False)
    collator = CountingCollator(DataCollatorWithPadding(tokenizer))
    clock = make_step_clock(device)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec["batch_size"],
            per_device_eval_batch_size=spec["eval_batch_size"] or TRAINER_EVAL_BATCH,
            learning_rate=spec["learning_rate"], num_train_epochs=1, seed=spec["seed"], use_cpu=device == "cpu",
            bf16=spec["precision"] == "bf16", report_to=[], save_strategy="no", eval_strategy="no",
            logging_steps=10**9, dataloader_num_workers=0, disable_tqdm=True,
            **sampling_arguments(TrainingArguments, spec["sampling"]),
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                          processing_class=tokenizer, compute_metrics=trainer_metrics, callbacks=[clock])
        if trainer.args.device.type != device:
            raise RowFailed(f"the Trainer chose {trainer.args.device}, not the row's device {device}")
        trainer.train()
        result = {"train_seconds": clock.end - clock.start, "train_samples": collator.samples,
                  "train_real_tokens": collator.real_tokens, "train_all_tokens": collator.all_tokens,
                  "train_steps": clock.steps, "optimizer": str(args.optim)}
        start = time.perf_counter()
        metrics = trainer.evaluate(dev_set)  # returns host metrics: the device work is done
        result.update(eval_seconds=time.perf_counter() - start, eval_samples=len(dev_set),
                      dev_accuracy=metrics["eval_accuracy"], dev_f1=metrics["eval_f1"])
        start = time.perf_counter()
        trainer.predict(predict_set)  # returns numpy arrays: synchronised
        result.update(predict_seconds=time.perf_counter() - start, predict_samples=len(predict_set))
    return {**result, **row_record(device, memory)}
