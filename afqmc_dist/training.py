"""The training loop: the same code on a CPU, one GPU, many GPUs or nodes, in fp32 or mixed precision.

Every rank runs every line here; accelerate decides what each one does (sharding, gradient sync, precision).
Decisions such as "is this the best model?" are taken from gathered metrics, which are identical on all ranks,
so every rank enters the same collectives in the same order.
"""

from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from .data import make_eval_dataloader, make_train_dataloader
from .evaluation import evaluate
from .outputs import RESULTS, save_best_model, write_json

NO_DECAY = ("bias", "LayerNorm.weight", "norm.weight")  # suffixes of parameter names


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases and LayerNorm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon)


def train(cfg, accelerator, model, tokenizer, train_set, dev_set, positive_id: int, tracker) -> dict:
    """Fine-tune `model`, evaluating on the dev file after every epoch (and every `cfg.eval_steps`).

    Keeps the best model (by dev accuracy) in OUTPUT_DIR/best and its metrics in OUTPUT_DIR/results.json.
    `positive_id` is the class whose F1 is reported. Returns the best record (same on every rank).
    """
    train_loader = make_train_dataloader(train_set, cfg, tokenizer)
    dev_loader = make_eval_dataloader(dev_set, cfg, tokenizer)
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_loader, dev_loader = accelerator.prepare(model, optimizer, train_loader, dev_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.num_train_epochs
    # A prepared scheduler steps once per process for every optimizer step (accelerate's convention for
    # per-device batches), so its horizon is counted in those units.
    scale = accelerator.num_processes
    scheduler = accelerator.prepare(get_scheduler(
        "linear", optimizer, num_warmup_steps=int(cfg.warmup_proportion * total_steps) * scale,
        num_training_steps=total_steps * scale))

    accelerator.print(f"training: {len(train_set)} pairs, {cfg.num_train_epochs} epochs, "
                      f"{total_steps} optimizer steps, global batch {cfg.global_batch_size(accelerator.num_processes)} "
                      f"({cfg.batch_size} per process x {accelerator.num_processes} processes x "
                      f"{cfg.gradient_accumulation_steps} accumulation)")

    best: dict | None = None
    step = 0

    def evaluate_and_keep_best(epoch: int) -> None:
        nonlocal best, window_start
        metrics = evaluate(model, dev_loader, accelerator, positive_id)
        model.train()
        tracker.log_eval(metrics, epoch=epoch, step=step)
        accelerator.print(f"eval epoch {epoch} step {step}: accuracy {metrics['accuracy']:.4f} "
                          f"f1 {metrics['f1']:.4f} loss {metrics['loss']:.4f} ({metrics['count']} pairs)")
        if best is None or metrics["accuracy"] > best["dev_accuracy"]:
            save_best_model(accelerator, model, tokenizer, cfg.output_dir)
            best = {"best_epoch": epoch, "best_step": step, "dev_accuracy": metrics["accuracy"],
                    "dev_f1": metrics["f1"], "dev_precision": metrics["precision"],
                    "dev_recall": metrics["recall"], "dev_loss": metrics["loss"], "eval_count": metrics["count"]}
            if accelerator.is_main_process:
                write_json(os.path.join(cfg.output_dir, RESULTS), best)
        window_start = time.perf_counter()  # training throughput excludes evaluation and saving

    progress = tqdm(total=total_steps, desc="train", unit="step", disable=not accelerator.is_local_main_process)
    # The loss stays on the device between log points: reading it every step would stall the GPU each step.
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_batches, samples, window_start = 0, 0, time.perf_counter()
    model.train()
    for epoch in range(1, cfg.num_train_epochs + 1):
        train_loader.set_epoch(epoch - 1)  # the shuffle is a function of (seed, epoch)
        for batch in train_loader:
            batch.pop("index")
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach()
            micro_batches += 1
            samples += batch["input_ids"].shape[0]
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                # reduce is a collective: every rank reaches it at the same step.
                mean_loss = accelerator.reduce(loss_sum / micro_batches, reduction="mean").item()
                rate = samples * accelerator.num_processes / (time.perf_counter() - window_start)
                lr = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                tracker.log({"loss": mean_loss, "learning_rate": lr, "samples_per_second": rate}, "train", step)
                loss_sum.zero_()
                micro_batches, samples, window_start = 0, 0, time.perf_counter()
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step % steps_per_epoch != 0:
                evaluate_and_keep_best(epoch)
        evaluate_and_keep_best(epoch)
    progress.close()
    return best
