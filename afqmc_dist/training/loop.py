"""The training loop: the same code on a CPU, one GPU, many GPUs or nodes, in fp32 or mixed precision.

Every rank runs every line here; accelerate decides what each one does (sharding, gradient sync, precision).
Decisions such as "is this the best model?" or "stop early?" are taken from gathered or broadcast values,
identical on all ranks, so every rank enters the same collectives in the same order.

A run can be stopped and resumed at any optimizer step (see checkpoints.py): the data order is a function of
(seed, epoch), the dataloaders have their own generators (so the global RNG, which drives dropout, only moves
with the model), and a resumed run skips exactly the batches already consumed in its epoch.

The gradient of every optimizer step is the mean over exactly the pairs of its global batch (sampling.py),
however they are spread over processes and accumulation steps: see loss.Objective. The training recipes (class
weights, label smoothing, R-Drop, FGM, EMA: recipes.py) plug into `step` and `evaluate`.
"""

from __future__ import annotations

import os

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from ..architectures import takes_token_types
from ..best_model import save_best_model
from ..checkpoints import TrainState, save_checkpoint
from ..data import make_eval_dataloader, make_train_dataloader
from ..errors import EXIT_PRUNED, EXIT_STOPPED, TrainingStopped
from ..evaluation import evaluate, loggable
from ..files import write_json
from ..outputs import RESULTS
from ..preemption import StopRequests
from ..resume import load_checkpoint
from ..sampling import micro_batches_per_epoch
from .optimizer import describe_rates, make_optimizer
from .recipes import Recipes
from .schedule import make_schedule
from .selection import BestModelPolicy, best_record
from .steps import finite_or_none, optimizer_step
from .throughput import Throughput


class Trainer:
    """Fine-tunes `model` on the training set, evaluating on the dev set after every epoch (and every
    --eval_steps), keeping the best model in OUTPUT_DIR/best and full checkpoints as --checkpointing_steps says.

    Its phases are its methods:

        Trainer(...)            set-up: loaders, optimizer, schedule, all prepared by accelerate; a checkpoint loaded
        train()                 the loop: epochs of optimizer steps until the schedule ends or early stopping
        train_epoch()           one epoch, or what is left of it
        step(batch)             one micro-batch: forward, backward, and the update once a global batch is in
        after_update()          what follows an update: log, evaluate, checkpoint, stop on a signal
        evaluate()              dev metrics, the best model kept, early stopping decided
        checkpoint()            the full training state saved
        stop_if_requested()     a stop signal: checkpoint and stop

    Everything a checkpoint saves and restores is `self.state` (checkpoints.TrainState) plus the prepared objects;
    the rest (counters of the logging window, the step last saved or evaluated) belongs to this process's run.
    A new per-step feature goes in `step` (what is computed) or `after_update` (what follows an update).
    """

    def __init__(self, cfg, plan, accelerator, model, tokenizer, train_set, dev_set, positive_id: int, tracker,
                 fingerprint: dict, resume_from: str | None, stop_requests: StopRequests, pruner=None,
                 class_weights: list[float] | None = None):
        self.cfg, self.plan, self.accelerator, self.tokenizer = cfg, plan, accelerator, tokenizer
        self.positive_id, self.tracker, self.stop_requests, self.pruner = positive_id, tracker, stop_requests, pruner
        self.num_pairs = len(train_set)
        token_types = takes_token_types(model)  # segment ids only for a model that takes them
        train_loader = make_train_dataloader(train_set, cfg, plan, tokenizer, accelerator, token_types)
        dev_loader = make_eval_dataloader(dev_set, cfg, plan, tokenizer, accelerator, token_types)
        optimizer = make_optimizer(model, cfg, accelerator.device)
        self.model, self.optimizer, self.train_loader, self.dev_loader = accelerator.prepare(
            model, optimizer, train_loader, dev_loader)
        self.schedule = make_schedule(cfg, self.num_pairs, plan.global_batch)
        # split_batches: the prepared scheduler steps once per optimizer step, whatever the number of processes.
        self.scheduler = accelerator.prepare(self.schedule.make_scheduler(cfg, self.optimizer))
        # Before a checkpoint is loaded: the weight average (EMA) is part of every checkpoint.
        self.recipes = Recipes(cfg, accelerator, self.model, class_weights)
        self.policy = BestModelPolicy(cfg.metric_for_best_model, cfg.early_stopping_threshold)
        self.counters = Throughput(accelerator.device)
        # The first non-finite loss, recorded on the device (no sync) and checked where the loop syncs anyway.
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
        self.saved: tuple[int, str] | None = None  # (step, path) of the last checkpoint
        self.evaluated_at: int | None = None
        self.last_update = None  # the StepResult of the last optimizer step
        self.state = TrainState(fingerprint=fingerprint, wandb_run_id=tracker.wandb_run_id,
                                num_processes=accelerator.num_processes)
        if resume_from:
            self.resume(resume_from)
        accelerator.print(f"training: {self.num_pairs} pairs, {self.schedule.describe()}, "
                          f"{micro_batches_per_epoch(self.schedule.batch_sizes, plan.micro_batch)} micro-batches per "
                          "process and epoch")
        recipes = self.recipes.describe()
        if recipes:
            accelerator.print(recipes)
        if cfg.layerwise_lr_decay:
            rates = describe_rates(optimizer.param_groups, model.config.num_hidden_layers)
            accelerator.print(f"layer-wise learning rates: {rates}")

    def resume(self, path: str) -> None:
        """Continue from checkpoint `path`: the prepared objects, the state and each rank's loss window."""
        self.state = load_checkpoint(self.accelerator, path, self.cfg.output_dir, self.schedule, self.plan)
        self.state.wandb_run_id = self.state.wandb_run_id or self.tracker.wandb_run_id
        self.tracker.last_step = self.state.step
        if self.state.window:
            self.counters.window += torch.tensor(self.state.window[self.accelerator.process_index],
                                                 dtype=torch.float64, device=self.accelerator.device)
        self.accelerator.print(f"resumed from {path}: step {self.state.step}, epoch {self.state.epoch}, "
                               f"{self.state.batches_in_epoch} batches into it")

    # --- the loop -----------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Train to the end of the schedule (or early stopping); return the best record and the throughput totals
        (the same on every rank). TrainingStopped after a stop signal (a checkpoint written), a non-finite loss
        or a pruned sweep trial."""
        state, total = self.state, self.schedule.total_steps
        self.progress = tqdm(total=total, initial=state.step, desc="train", unit="step",
                             disable=not self.accelerator.is_local_main_process)
        self.model.train()
        # A run resumed from its final checkpoint has nothing left to do.
        finished = state.step >= total and state.batches_in_epoch == 0
        with self.stop_requests.deferred(), self.progress:
            self.stop_if_requested()  # a signal that came while the run was being set up
            while not finished:
                finished = self.train_epoch() or state.step >= total
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if self.cfg.checkpointing_steps == "epoch":
                    self.checkpoint()
        if self.cfg.checkpoint_interval and state.step % self.cfg.checkpoint_interval != 0:
            self.checkpoint()  # the final state, so that a finished run can be inspected or extended
        self.tracker.summarize({"train_steps": state.step})
        totals = self.counters.summary()
        return {**state.best, **totals, **self.recipes.summary(totals["train_runtime"])}

    def train_epoch(self) -> bool:
        """The current epoch from where it stands; True when early stopping says to stop."""
        state = self.state
        self.train_loader.set_epoch(state.epoch - 1)  # the order is a function of (seed, epoch)
        # A resumed epoch skips the batches it already trained on (same order: same seed and epoch).
        batches = self.accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch) \
            if state.batches_in_epoch else self.train_loader
        stop = False
        self.counters.start()
        for batch in batches:
            if state.step >= self.schedule.total_steps:
                break  # --max_steps reached part-way through the epoch (or resumed there)
            if self.step(batch):
                stop = self.after_update()
                if stop:
                    break  # early stopping
        self.counters.stop()
        if self.evaluated_at != state.step:  # not just evaluated (only early stopping leaves the loop right after)
            stop = self.evaluate() or stop
        return stop

    def step(self, batch: dict) -> bool:
        """Train on one micro-batch; True when it completed a global batch and the optimizer stepped."""
        batch.pop("index")
        weight, mask = batch["weight"], batch["attention_mask"]
        real_pairs = self.schedule.batch_sizes[self.state.batches_in_epoch // self.plan.accumulation]
        scale = self.plan.num_processes * self.plan.accumulation / real_pairs
        with self.accelerator.accumulate(self.model):
            loss, summed = self.recipes.objective(self.model, batch, scale)
            self.accelerator.backward(loss)
            self.recipes.after_backward(self.model, batch, scale)
            update = optimizer_step(self.accelerator, self.model, self.optimizer, self.scheduler,
                                    self.cfg.max_grad_norm, self.cfg.skip_nonfinite_loss)
        if update.skipped:
            self.accelerator.print(f"step {self.state.step + 1}: non-finite gradients, update skipped")
        elif self.accelerator.sync_gradients:
            self.recipes.after_update(self.model)
        self.count(summed, weight, mask)
        self.state.batches_in_epoch += 1
        if not self.accelerator.sync_gradients:
            return False
        self.last_update = update
        self.state.step += 1
        self.progress.update(1)
        return True

    def count(self, summed: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a micro-batch to the logging window; a non-finite loss is recorded for `check_finite`, or left out
        with --skip_nonfinite_loss."""
        finite = torch.isfinite(summed)
        if not self.cfg.skip_nonfinite_loss:
            step = self.state.step + 1
            self.first_bad_step.copy_(torch.where((self.first_bad_step < 0) & ~finite, step, self.first_bad_step))
            self.counters.add(summed, weight, mask)
        elif finite.item():
            self.counters.add(summed, weight, mask)

    def after_update(self) -> bool:
        """Log, evaluate, checkpoint and honour a stop signal as the step count says; True to stop early."""
        state, cfg, total = self.state, self.cfg, self.schedule.total_steps
        if state.step % cfg.logging_steps == 0 or state.step == total:
            self.log_window()
        stop = False
        # The end of an epoch and of the run evaluate anyway (train_epoch).
        mid_epoch = self.schedule.steps_done_in_epoch(state.step, state.epoch) < self.schedule.steps_per_epoch
        if cfg.eval_steps and state.step % cfg.eval_steps == 0 and mid_epoch and state.step < total:
            stop = self.evaluate()
        if cfg.checkpoint_interval and state.step % cfg.checkpoint_interval == 0:
            self.checkpoint()
        self.stop_if_requested()
        return stop

    def log_window(self) -> None:
        """The logging window's loss and throughput, the learning rate and the gradient norm (a collective)."""
        self.check_finite()
        stats = {**self.counters.read(self.accelerator), "learning_rate": self.scheduler.get_last_lr()[0],
                 "grad_norm": finite_or_none(self.last_update.grad_norm)}
        self.progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['learning_rate']:.2e}",
                                  samples_s=f"{stats['samples_per_second']:.1f}",
                                  tokens_s=f"{stats['tokens_per_second']:.0f}")
        self.tracker.log(stats, "train", self.state.step, self.state.epoch)  # it leaves out what is not finite

    # --- evaluating, saving, stopping -----------------------------------------------------------------------------

    def check_finite(self) -> None:
        """TrainingStopped if any rank's loss was NaN/inf (a collective: the loop calls it where it syncs)."""
        bad = self.accelerator.gather(self.first_bad_step[None])
        bad = bad[bad >= 0]
        if bad.numel():
            raise TrainingStopped(
                f"the training loss became NaN/inf at step {bad.min().item()}; stopped without saving (the last "
                "checkpoint and best/ are from before it). Lower --learning_rate, or pass --skip_nonfinite_loss")

    def evaluate(self) -> bool:
        """Evaluate on dev and keep the best model; True if early stopping says to stop (same on every rank)."""
        state, cfg = self.state, self.cfg
        self.check_finite()
        self.counters.stop()
        evaluated = self.recipes.evaluated_model(self.model)
        metrics = evaluate(evaluated, self.dev_loader, self.accelerator, self.positive_id, list(cfg.label_list))
        self.model.train()
        self.evaluated_at = state.step
        self.tracker.log(loggable(metrics), "dev", state.step, state.epoch)
        self.accelerator.print(f"eval epoch {state.epoch} step {state.step}: accuracy {metrics['accuracy']:.4f} "
                               f"f1 {metrics['f1']:.4f} loss {metrics['loss']:.4f} ({metrics['count']} pairs)")
        if self.pruner is not None and self.pruner.should_prune(state.step, metrics):
            raise TrainingStopped(self.pruner.pruned_message(state.step), exit_code=EXIT_PRUNED)
        best = state.best
        if self.policy.is_best(metrics, best):
            save_best_model(self.accelerator, evaluated, self.tokenizer, cfg.output_dir)
            state.best = {**best_record(metrics, state.step, state.epoch), **self.recipes.best_note()}
            if self.accelerator.is_main_process:
                write_json(os.path.join(cfg.output_dir, RESULTS), state.best)
        improved = self.policy.improved(metrics, best)
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
        stop = bool(cfg.early_stopping_patience) and state.evals_without_improvement >= cfg.early_stopping_patience
        # Decided on the main process and broadcast: one rank's rounding can never leave another rank waiting.
        stop = broadcast_object_list([stop])[0]
        if stop:
            self.accelerator.print(f"early stopping at step {state.step}: no gain of at least "
                                   f"{cfg.early_stopping_threshold} in dev {cfg.metric_for_best_model} in "
                                   f"{state.evals_without_improvement} evaluations")
        self.counters.start()
        return stop

    def checkpoint(self) -> str:
        """Save the full training state (a collective); return the checkpoint's path."""
        self.check_finite()
        self.counters.stop()
        # Each rank's partial loss window travels with the checkpoint, so the next logged loss is the same.
        self.state.window = self.accelerator.gather(self.counters.window[None]).tolist()
        path = save_checkpoint(self.accelerator, self.cfg.output_dir, self.state, self.cfg.save_total_limit)
        self.saved = (self.state.step, path)
        self.counters.start()
        return path

    def stop_if_requested(self) -> None:
        """After a stop signal (on any rank): checkpoint (unless this step just was) and stop with status 3."""
        signal_name = self.stop_requests.requested()
        if signal_name:
            path = self.saved[1] if self.saved and self.saved[0] == self.state.step else self.checkpoint()
            raise TrainingStopped(f"{signal_name} received: stopped after step {self.state.step} and saved {path}; "
                                  "continue with --resume_from_checkpoint latest", exit_code=EXIT_STOPPED)
