"""The order in which training pairs are drawn: global batches, the same on any number of processes.

A global batch is the set of pairs of one optimizer step (`BatchPlan.global_batch` of them). The sampler draws an
epoch's global batches from one generator seeded by (seed, epoch) and lays them end to end as one stream of
indices. The DataLoader cuts that stream into micro-batches of `per_device x processes` pairs, and accelerate's
`split_batches` gives process p the p-th slice of each. So global batch g holds the same pairs whether one process
trains it, or eight, or one process accumulating eight micro-batches: only how it is cut differs.

The last global batch of an epoch is incomplete when the data size is not a multiple of G. It is trained on
(unless `drop_last`) with its loss normalised by its real size (`global_batch_sizes`), so its gradient is the mean
over exactly its pairs. On several processes it is topped up to whole micro-batches with weight-0 copies of its
own pairs (indices >= N, see `PairDataset`), because every process has to take part in every step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def global_batch_sizes(num_samples: int, global_batch: int, drop_last: bool) -> list[int]:
    """Real pairs in each global batch of an epoch: all `global_batch`, except an incomplete last one (dropped
    with `drop_last`)."""
    full, rest = divmod(num_samples, global_batch)
    return [global_batch] * full + ([rest] if rest and not drop_last else [])


def micro_batches_per_epoch(sizes: Sequence[int], micro_batch: int) -> int:
    """DataLoader batches (= micro-batches of each process) in an epoch of global batches of `sizes`."""
    return sum(math.ceil(size / micro_batch) for size in sizes)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s order: a function of (seed, epoch) only, so a resumed run draws the same."""
    return seed * 100_003 + epoch


class GlobalBatchSampler(Sampler[int]):
    """Indices of one epoch's training pairs, global batch after global batch (see the module docstring).

    `lengths` (token count of every pair) turns on length grouping: the epoch's random permutation is cut into
    mega-batches of `group_size` global batches, each sorted by length and cut into global batches, and the
    order of those batches is shuffled again. Batches then hold pairs of similar length (little padding), and
    every epoch is still a fresh random order. The batch holding the longest pair comes first, so that running
    out of memory shows at the first step, not hours into the epoch.

    `pad_to`: the incomplete last global batch is topped up to a multiple of it with weight-0 copies (index
    `num_samples + i` is a copy of pair i); pass the micro-batch size on several processes, 1 on one.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, *, lengths: list[int] | None = None,
                 group_size: int = 100, drop_last: bool = False, pad_to: int = 1):
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} pairs")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.lengths, self.group_size, self.drop_last, self.pad_to = lengths, group_size, drop_last, pad_to
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (real pairs only), in training order."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.lengths is not None:
            lengths, mega = self.lengths, self.group_size * self.global_batch
            # Longest first within each mega-batch; a stable sort keeps the random order among equal lengths.
            order = [i for start in range(0, self.num_samples, mega)
                     for i in sorted(order[start:start + mega], key=lambda i: -lengths[i])]
        batches = [order[start:start + self.global_batch] for start in range(0, self.num_samples, self.global_batch)]
        incomplete = batches.pop() if len(batches[-1]) < self.global_batch else None
        if self.lengths is not None and batches:
            # Sorted mega-batches would feed long batches, then shorter and shorter ones: shuffle whole batches.
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
            longest = max(range(len(batches)), key=lambda k: self.lengths[batches[k][0]])
            batches.insert(0, batches.pop(longest))
        # The incomplete batch stays last: the training loop finds its size from its position.
        if incomplete and not self.drop_last:
            batches.append(incomplete)
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.global_batches():
            yield from batch
            missing = -len(batch) % self.pad_to
            yield from (self.num_samples + i for i in itertools.islice(itertools.cycle(batch), missing))

    def __len__(self) -> int:
        sizes = global_batch_sizes(self.num_samples, self.global_batch, self.drop_last)
        return sum(size + -size % self.pad_to for size in sizes)
