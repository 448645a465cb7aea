"""The tutorial row: the well-known AFQMC fine-tuning tutorial's loop, re-implemented as it is written.

A Dataset of raw JSON pairs, a collate_fn that tokenises each batch (padding=True), DataLoader(shuffle=True),
torch.optim.AdamW + get_scheduler("linear"), `loss.item()` every step (its progress bar is left out), dev
evaluation in file order at the training batch size under no_grad, prediction one pair at a time. The model and
every batch go to the row's device (`spec["device"]`, as the tutorial's `device = 'cuda' if ... else 'cpu'`);
bf16 is the forward pass under torch.autocast on that device.

Run by `bench/throughput.py` in a child process: `worker_tutorial(spec) -> dict` of counts and seconds.
"""

from __future__ import annotations

from bench.common import accuracy_f1, read_jsonl, seed_everything
from bench.measure import Memory, autocast, row_record, strict_fp32, timed


class AFQMC:
    """The tutorial's dataset: every JSON line of the file, kept raw, indexed by line number."""

    def __init__(self, data_file: str):
        self.data = dict(enumerate(read_jsonl(data_file)))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict:
        return self.data[idx]


def tutorial_collate(batch_samples: list[dict], tokenizer, max_length: int):
    """The tutorial's collate_fn: tokenise the batch's pairs, padded to the longest, and stack the labels."""
    import torch

    x = tokenizer([s["sentence1"] for s in batch_samples], [s["sentence2"] for s in batch_samples],
                  padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    y = torch.tensor([int(s["label"]) for s in batch_samples])
    return x, y


def train_loop(dataloader, model, loss_fn, optimizer, lr_scheduler, device: str, precision: str) -> dict:
    """One epoch of the tutorial's train_loop, timed from the first batch to the last optimizer step."""
    counts = {"train_real_tokens": 0, "train_all_tokens": 0, "train_samples": 0}
    total_loss, steps = 0.0, 0
    model.train()
    with timed(device, counts, "train_seconds"):
        for x, y in dataloader:
            mask = x["attention_mask"]  # counted on the host copy: no extra device sync
            counts["train_real_tokens"] += int(mask.sum())
            counts["train_all_tokens"] += mask.numel()
            counts["train_samples"] += len(y)
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                pred = model(**x).logits
            loss = loss_fn(pred.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            total_loss += loss.item()  # the tutorial's running loss: a host sync every step
            steps += 1
    return {**counts, "train_loss": total_loss / steps}


def test_loop(dataloader, model, device: str, precision: str) -> tuple[list[int], list[int], float, float]:
    """The tutorial's test_loop (file order, training batch size, no_grad): predictions, labels, mean
    cross-entropy (not in the tutorial: a finer measure than accuracy of what a run learnt), seconds."""
    import torch

    preds, labels, loss_sum, clock = [], [], 0.0, {}
    model.eval()
    with timed(device, clock, "seconds"), torch.no_grad():
        for x, y in dataloader:
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                pred = model(**x).logits
            preds += pred.argmax(1).tolist()
            labels += y.tolist()
            loss_sum += torch.nn.functional.cross_entropy(pred.float(), y, reduction="sum").item()
    return preds, labels, loss_sum / len(labels), clock["seconds"]


def predict_one_by_one(dataset: AFQMC, model, tokenizer, max_length: int, device: str, precision: str) -> float:
    """The tutorial's prediction: one pair at a time (batch of 1). Returns seconds."""
    import torch

    model.eval()
    clock = {}
    with timed(device, clock, "seconds"), torch.no_grad():
        for idx in range(len(dataset)):
            sample = dataset[idx]
            x = tokenizer(sample["sentence1"], sample["sentence2"], truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
            with autocast(device, precision):
                model(**x).logits.argmax(1).item()
    return clock["seconds"]


def worker_tutorial(spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    device, precision = spec["device"], spec["precision"]
    torch.set_num_threads(spec["threads"])
    strict_fp32()
    memory = Memory(device).start()
    seed_everything(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2).to(device)
    max_length, batch_size = spec["max_seq_length"], spec["batch_size"]

    def collate(batch):
        return tutorial_collate(batch, tokenizer, max_length)

    train_loader = DataLoader(AFQMC(spec["train_file"]), batch_size=batch_size, shuffle=True, collate_fn=collate)
    dev_loader = DataLoader(AFQMC(spec["dev_file"]), batch_size=batch_size, shuffle=False, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"])
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=len(train_loader))

    result = train_loop(train_loader, model, torch.nn.CrossEntropyLoss(), optimizer, lr_scheduler, device, precision)
    preds, labels, dev_loss, eval_seconds = test_loop(dev_loader, model, device, precision)
    accuracy, f1 = accuracy_f1(preds, labels)
    result.update(eval_seconds=eval_seconds, eval_samples=len(labels), dev_accuracy=accuracy, dev_f1=f1,
                  dev_loss=dev_loss)
    if spec.get("predict_file"):
        predict_set = AFQMC(spec["predict_file"])
        result.update(predict_seconds=predict_one_by_one(predict_set, model, tokenizer, max_length, device, precision),
                      predict_samples=len(predict_set))
    return {**result, **row_record(device, memory)}
