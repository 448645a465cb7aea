"""Specification of the training order: global batches drawn from (seed, epoch) only, cut the same way by any
number of processes and accumulation steps, length-grouped with little padding."""

from __future__ import annotations

import itertools
import random

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from afqmc_dist.sampling import GlobalBatchSampler, global_batch_sizes, micro_batches_per_epoch

N, G = 203, 8  # not a multiple of the global batch: the last one holds 3 pairs


def random_lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 120) for _ in range(n)]


LENGTHS = random_lengths(N, seed=0)


def epoch(sampler: GlobalBatchSampler, number: int) -> list[list[int]]:
    sampler.set_epoch(number)
    return sampler.global_batches()


def test_global_batch_sizes_are_full_except_an_incomplete_last_one():
    assert global_batch_sizes(N, G, drop_last=False) == [8] * 25 + [3]
    assert global_batch_sizes(N, G, drop_last=True) == [8] * 25
    assert global_batch_sizes(16, G, drop_last=False) == [8, 8]
    assert micro_batches_per_epoch([8] * 25 + [3], micro_batch=4) == 25 * 2 + 1


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["random", "length-grouped"])
def test_each_epoch_is_a_fresh_permutation_that_depends_only_on_seed_and_epoch(lengths):
    sampler = GlobalBatchSampler(N, G, seed=3, lengths=lengths)
    first, second = epoch(sampler, 0), epoch(sampler, 1)

    for batches in (first, second):
        assert sorted(i for batch in batches for i in batch) == list(range(N))
        assert [len(b) for b in batches] == global_batch_sizes(N, G, drop_last=False)  # the short one last
    assert first != second
    assert epoch(GlobalBatchSampler(N, G, seed=3, lengths=lengths), 0) == first  # another process agrees
    assert epoch(GlobalBatchSampler(N, G, seed=4, lengths=lengths), 0) != first
    assert list(sampler) == [i for batch in second for i in batch]  # one process: the batches end to end


def test_drop_last_leaves_out_the_incomplete_global_batch():
    batches = epoch(GlobalBatchSampler(N, G, seed=3, drop_last=True), 0)
    assert [len(b) for b in batches] == [G] * 25


def process_micro_batches(sampler: GlobalBatchSampler, micro_batch: int, processes: int, rank: int) -> list[list[int]]:
    """What accelerate hands process `rank` (split_batches=True): its slice of every DataLoader batch."""
    batches = BatchSampler(sampler, micro_batch, drop_last=False)
    if processes == 1:
        return list(batches)
    return list(BatchSamplerShard(batches, num_processes=processes, process_index=rank, split_batches=True))


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["random", "length-grouped"])
@pytest.mark.parametrize(("processes", "accumulation"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)])
def test_every_layout_of_processes_and_accumulation_trains_the_same_global_batches(lengths, processes, accumulation):
    per_device = G // (processes * accumulation)
    micro = per_device * processes
    sampler = GlobalBatchSampler(N, G, seed=3, lengths=lengths, pad_to=micro if processes > 1 else 1)
    reference = epoch(GlobalBatchSampler(N, G, seed=3, lengths=lengths), 0)
    sampler.set_epoch(0)
    shards = [process_micro_batches(sampler, micro, processes, rank) for rank in range(processes)]

    assert len({len(shard) for shard in shards}) == 1, "every process runs the same number of micro-batches"
    assert len(shards[0]) == micro_batches_per_epoch(global_batch_sizes(N, G, False), micro)
    for g, expected in enumerate(reference):
        steps = range(g * accumulation, min((g + 1) * accumulation, len(shards[0])))
        trained = [i for step in steps for shard in shards for i in shard[step]]
        real = [i for i in trained if i < N]
        assert sorted(real) == sorted(expected), f"global batch {g}"
        assert all(i - N in expected for i in trained if i >= N), "padding copies come from the same batch"
    assert len(sampler) == sum(len(shard[step]) for shard in shards for step in range(len(shard)))


def test_only_the_last_global_batch_is_topped_up_to_whole_micro_batches():
    sampler = GlobalBatchSampler(N, G, seed=3, pad_to=4)
    order = list(sampler)
    assert len(order) == len(sampler) == 25 * G + 4
    assert all(i < N for i in order[:N]) and all(i >= N for i in order[N:])


def padding_fraction(batches: list[list[int]], lengths: list[int], per_device: int) -> float:
    """Padding of the micro-batches each process computes (padded to its longest pair)."""
    chunks = [batch[k:k + per_device] for batch in batches for k in range(0, len(batch), per_device)]
    computed = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    return 1 - sum(lengths[i] for c in chunks for i in c) / computed


def test_length_grouping_leaves_little_padding_and_still_shuffles_the_batches():
    lengths = random_lengths(2000, seed=1)
    grouped = epoch(GlobalBatchSampler(2000, 16, seed=3, lengths=lengths), 0)
    plain = epoch(GlobalBatchSampler(2000, 16, seed=3), 0)

    assert padding_fraction(grouped, lengths, 16) < 0.05
    assert padding_fraction(plain, lengths, 16) > 0.3
    longest = [max(lengths[i] for i in batch) for batch in grouped]
    assert longest[0] == max(lengths), "the longest batch first: out-of-memory shows at step 1"
    rises = sum(b > a for a, b in itertools.pairwise(longest[1:]))
    assert 0.3 < rises / (len(longest) - 2) < 0.7, "batch lengths in random order, not sorted runs"


def test_a_larger_group_size_means_less_padding():
    lengths = random_lengths(4000, seed=2)
    fractions = [padding_fraction(epoch(GlobalBatchSampler(4000, 16, seed=3, lengths=lengths, group_size=size), 0),
                                  lengths, 16) for size in (5, 50, 250)]
    assert fractions[0] > fractions[1] > fractions[2]
