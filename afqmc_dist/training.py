"""The training loop: the same code on a CPU, one GPU, many GPUs or nodes, in fp32 or mixed precision.

Every rank runs every line here; accelerate decides what each one does (sharding, gradient sync, precision).
Decisions such as "is this the best model?" or "stop early?" are taken from gathered or broadcast values,
identical on all ranks, so every rank enters the same collectives in the same order.

A run can be stopped and resumed at any optimizer step (see checkpoints.py): the data order is a function of
(seed, epoch), the dataloaders have their own generators (so the global RNG, which drives dropout, only moves
with the model), and a resumed run skips exactly the batches already consumed in its epoch.

The gradient of every optimizer step is the mean over exactly the pairs of its global batch (sampling.py),
however they are spread over processes and accumulation steps: see `pair_loss`.
"""

from __future__ import annotations

import math
import os
import time

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from tqdm.auto import tqdm

from .best_model import save_best_model
from .checkpoints import TrainState, save_checkpoint
from .data import make_eval_dataloader, make_train_dataloader
from .errors import EXIT_PRUNED, EXIT_STOPPED, TrainingStopped
from .evaluation import evaluate, loggable
from .files import write_json
from .outputs import RESULTS
from .preemption import StopRequests
from .resume import load_checkpoint
from .sampling import micro_batches_per_epoch
from .schedule import make_schedule
from .selection import BestModelPolicy, best_record
from .steps import finite_or_none, optimizer_step

NO_DECAY = ("bias", "LayerNorm.weight", "norm.weight")  # suffixes of parameter names


def make_optimizer(model, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases and LayerNorm weights).

    The fused implementation (one kernel over all parameters) on CUDA and on the CPU: measured on the CPU with a
    4-layer BERT and the 21k-token Chinese vocabulary, its step took a third of the default one's time.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=device.type in ("cuda", "cpu") or None)


def pair_loss(model, batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch; return (the loss to backpropagate, the summed cross-entropy of its real pairs).

    `batch` holds the model inputs, `labels` and `weight` (0 for padding copies). The loss is
    sum(weight x cross-entropy) x `scale`, with scale = processes x accumulation / real pairs of the global
    batch: accelerate divides it by the accumulation steps and DDP (or FSDP, DeepSpeed) averages gradients over
    the processes, so the step's gradient is the mean over exactly the global batch's pairs.
    """
    weight, labels = batch.pop("weight"), batch.pop("labels")
    logits = model(**batch).logits.float()  # [B, num_labels]
    summed = (nn.functional.cross_entropy(logits, labels, reduction="none") * weight).sum()
    return summed * scale, summed.detach()


class Throughput:
    """Training counters kept on the device between log points (reading them every step would stall a GPU).

    `window` holds [summed loss, real pairs, real tokens, all tokens] since the last log (padding copies count
    as padding tokens, not as pairs). Time is counted only while training steps run (`start`/`stop` around
    evaluation and saving); totals cover the whole run.
    """

    def __init__(self, device):
        self.window = torch.zeros(4, dtype=torch.float64, device=device)
        self.window_seconds, self.started = 0.0, None
        self.total_samples, self.total_seconds, self.total_real, self.total_all = 0.0, 0.0, 0.0, 0.0

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.started is not None:
            seconds = time.perf_counter() - self.started
            self.window_seconds += seconds
            self.total_seconds += seconds
            self.started = None

    def add(self, summed_loss, weight, attention_mask) -> None:
        real_tokens = (attention_mask.sum(dim=1) * weight).sum()
        all_tokens = torch.full((), attention_mask.numel(), device=weight.device)
        self.window += torch.stack([summed_loss, weight.sum(), real_tokens, all_tokens]).double()

    def read(self, accelerator) -> dict:
        """Reduce the window across processes (a collective: call on every rank), return its numbers, restart."""
        self.stop()
        loss_sum, pairs, real, total = accelerator.reduce(self.window, reduction="sum").tolist()
        seconds = max(self.window_seconds, 1e-9)
        stats = {"loss": loss_sum / pairs if pairs else math.nan,  # nan: every batch was skipped
                 "samples_per_second": pairs / seconds,
                 "tokens_per_second": real / seconds, "padding_fraction": 1 - real / total if total else 0.0}
        self.total_samples += pairs
        self.total_real += real
        self.total_all += total
        self.window.zero_()
        self.window_seconds = 0.0
        self.start()
        return stats

    def summary(self) -> dict:
        seconds = max(self.total_seconds, 1e-9)
        return {"train_runtime": round(self.total_seconds, 3),
                "train_samples_per_second": self.total_samples / seconds,
                "train_tokens_per_second": self.total_real / seconds,
                "train_padding_fraction": 1 - self.total_real / max(self.total_all, 1.0)}


def train(cfg, plan, accelerator, model, tokenizer, train_set, dev_set, positive_id: int, tracker,
          fingerprint: dict, resume_from: str | None, stop_requests: StopRequests, pruner=None) -> dict:
    """Fine-tune `model`, evaluating on the dev file after every epoch (and every `cfg.eval_steps`).

    Keeps the best model (by --metric_for_best_model) in OUTPUT_DIR/best and its record in OUTPUT_DIR/results.json,
    and full checkpoints as --checkpointing_steps says. `positive_id` is the class whose F1 is reported with two
    labels; `fingerprint` is stored in checkpoints; `resume_from` is a checkpoint to continue from;
    `stop_requests` the run's signal handler (cli.run installs it); `pruner` a sweep trial's reporter
    (pruning.py) or None. Returns the best record (same on every rank). Raises TrainingStopped after a stop
    signal (checkpoint written), a non-finite loss or a pruned trial.
    """
    # --- setup ---
    train_loader = make_train_dataloader(train_set, cfg, plan, tokenizer, accelerator)
    dev_loader = make_eval_dataloader(dev_set, cfg, plan, tokenizer, accelerator)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer, train_loader, dev_loader = accelerator.prepare(model, optimizer, train_loader, dev_loader)
    schedule = make_schedule(cfg, len(train_set), plan.global_batch)
    batch_sizes, total_steps = schedule.batch_sizes, schedule.total_steps
    # split_batches: the prepared scheduler steps once per optimizer step, whatever the number of processes.
    scheduler = accelerator.prepare(schedule.make_scheduler(cfg, optimizer))
    policy = BestModelPolicy(cfg.metric_for_best_model, cfg.early_stopping_threshold)

    state = TrainState(fingerprint=fingerprint, wandb_run_id=tracker.wandb_run_id,
                       num_processes=accelerator.num_processes)
    counters = Throughput(accelerator.device)
    if resume_from:
        state = load_checkpoint(accelerator, resume_from, cfg.output_dir, schedule, plan)
        state.wandb_run_id = state.wandb_run_id or tracker.wandb_run_id
        tracker.last_step = state.step
        if state.window:
            counters.window += torch.tensor(state.window[accelerator.process_index], dtype=torch.float64,
                                            device=accelerator.device)
        accelerator.print(f"resumed from {resume_from}: step {state.step}, epoch {state.epoch}, "
                          f"{state.batches_in_epoch} batches into it")
    accelerator.print(f"training: {len(train_set)} pairs, {schedule.describe()}, "
                      f"{micro_batches_per_epoch(batch_sizes, plan.micro_batch)} micro-batches per process "
                      "and epoch")

    # The first non-finite loss, recorded on the device (no sync) and checked where the loop syncs anyway.
    first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)

    def check_finite() -> None:
        bad = accelerator.gather(first_bad_step[None])
        bad = bad[bad >= 0]
        if bad.numel():
            raise TrainingStopped(
                f"the training loss became NaN/inf at step {bad.min().item()}; stopped without saving (the last "
                "checkpoint and best/ are from before it). Lower --learning_rate, or pass --skip_nonfinite_loss")

    def checkpoint() -> str:
        check_finite()
        counters.stop()
        # Each rank's partial loss window travels with the checkpoint, so the next logged loss is the same.
        state.window = accelerator.gather(counters.window[None]).tolist()
        path = save_checkpoint(accelerator, cfg.output_dir, state, cfg.save_total_limit)
        counters.start()
        return path

    def evaluate_and_decide() -> bool:
        """Evaluate on dev, keep the best model; True if early stopping says to stop (same on every rank)."""
        check_finite()
        counters.stop()
        metrics = evaluate(model, dev_loader, accelerator, positive_id, list(cfg.label_list))
        model.train()
        tracker.log(loggable(metrics), "dev", state.step, state.epoch)
        accelerator.print(f"eval epoch {state.epoch} step {state.step}: accuracy {metrics['accuracy']:.4f} "
                          f"f1 {metrics['f1']:.4f} loss {metrics['loss']:.4f} ({metrics['count']} pairs)")
        if pruner is not None and pruner.should_prune(state.step, metrics):
            raise TrainingStopped(pruner.pruned_message(state.step), exit_code=EXIT_PRUNED)
        best = state.best
        if policy.is_best(metrics, best):
            save_best_model(accelerator, model, tokenizer, cfg.output_dir)
            state.best = best_record(metrics, state.step, state.epoch)
            if accelerator.is_main_process:
                write_json(os.path.join(cfg.output_dir, RESULTS), state.best)
        state.evals_without_improvement = 0 if policy.improved(metrics, best) else state.evals_without_improvement + 1
        stop = bool(cfg.early_stopping_patience) and state.evals_without_improvement >= cfg.early_stopping_patience
        # Decided on the main process and broadcast: one rank's rounding can never leave another rank waiting.
        stop = broadcast_object_list([stop])[0]
        if stop:
            accelerator.print(f"early stopping at step {state.step}: no gain of at least "
                              f"{cfg.early_stopping_threshold} in dev {cfg.metric_for_best_model} in "
                              f"{state.evals_without_improvement} evaluations")
        counters.start()
        return stop

    def stop_if_requested() -> None:
        signal_name = stop_requests.requested()
        if signal_name:
            path = saved if saved_at == state.step else checkpoint()
            raise TrainingStopped(f"{signal_name} received: stopped after step {state.step} and saved {path}; "
                                  "continue with --resume_from_checkpoint latest", exit_code=EXIT_STOPPED)

    # --- train ---
    progress = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    model.train()
    # A run resumed from its final checkpoint has nothing left to do.
    finished = state.step >= total_steps and state.batches_in_epoch == 0
    saved, saved_at, evaluated_at = None, None, None
    with stop_requests.deferred(), progress:
        stop_if_requested()  # a signal that came while the run was being set up
        while not finished:
            train_loader.set_epoch(state.epoch - 1)  # the order is a function of (seed, epoch)
            # A resumed epoch skips the batches it already trained on (same order: same seed and epoch).
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch) \
                if state.batches_in_epoch else train_loader
            counters.start()
            for batch in batches:
                if state.step >= total_steps:
                    break  # --max_steps reached part-way through the epoch (or resumed there)
                batch.pop("index")
                weight, mask = batch["weight"], batch["attention_mask"]
                real_pairs = batch_sizes[state.batches_in_epoch // plan.accumulation]
                with accelerator.accumulate(model):
                    loss, summed = pair_loss(model, batch, plan.num_processes * plan.accumulation / real_pairs)
                    accelerator.backward(loss)
                    step = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm,
                                          cfg.skip_nonfinite_loss)
                if step.skipped:
                    accelerator.print(f"step {state.step + 1}: non-finite gradients, update skipped")
                finite = torch.isfinite(summed)
                if not cfg.skip_nonfinite_loss:
                    first_bad_step.copy_(torch.where((first_bad_step < 0) & ~finite, state.step + 1, first_bad_step))
                    counters.add(summed, weight, mask)
                elif finite.item():
                    counters.add(summed, weight, mask)
                state.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                progress.update(1)
                if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                    check_finite()
                    stats = {**counters.read(accelerator), "learning_rate": scheduler.get_last_lr()[0],
                             "grad_norm": finite_or_none(step.grad_norm)}
                    progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['learning_rate']:.2e}",
                                         samples_s=f"{stats['samples_per_second']:.1f}",
                                         tokens_s=f"{stats['tokens_per_second']:.0f}")
                    tracker.log(stats, "train", state.step, state.epoch)  # it leaves out what is not finite
                # The end of an epoch and of the run evaluate anyway (below).
                mid_epoch = schedule.steps_done_in_epoch(state.step, state.epoch) < schedule.steps_per_epoch
                if cfg.eval_steps and state.step % cfg.eval_steps == 0 and mid_epoch and state.step < total_steps:
                    finished, evaluated_at = evaluate_and_decide(), state.step
                if cfg.checkpoint_interval and state.step % cfg.checkpoint_interval == 0:
                    saved, saved_at = checkpoint(), state.step
                stop_if_requested()
                if finished:
                    break  # early stopping
            counters.stop()
            if evaluated_at != state.step:  # not just evaluated (only early stopping leaves the loop right after)
                finished = evaluate_and_decide() or finished
                evaluated_at = state.step
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            finished = finished or state.step >= total_steps
            if cfg.checkpointing_steps == "epoch":
                checkpoint()
    if cfg.checkpoint_interval and state.step % cfg.checkpoint_interval != 0:
        checkpoint()  # the final state, so that a finished run can be inspected or extended
    tracker.summarize({"train_steps": state.step})
    return {**state.best, **counters.summary()}
