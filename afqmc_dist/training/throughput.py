"""Training counters: the loss and throughput of each logging window, and the run's totals."""

from __future__ import annotations

import math
import time

import torch


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
