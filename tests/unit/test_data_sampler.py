"""PreferenceSampler: layout, determinism, exact resume, DP coverage."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from megatron_adadpo.data import PreferenceSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_layout_without_shuffle_is_megatrons():
    # 8 pairs, global batch 8 = micro-batch 2 x DP 2 x 2 micro-batches.
    ranks = [PreferenceSampler(8, 8, 2, r, 2, seed=0, shuffle=False) for r in range(2)]
    assert ranks[0].num_microbatches == 2
    assert take(ranks[0], 4) == [[0, 1], [4, 5], [0, 1], [4, 5]]
    assert take(ranks[1], 2) == [[2, 3], [6, 7]]


def test_deterministic_and_reshuffled_per_epoch():
    a = take(PreferenceSampler(40, 8, 4, 0, 1, seed=7), 20)
    b = take(PreferenceSampler(40, 8, 4, 0, 1, seed=7), 20)
    c = take(PreferenceSampler(40, 8, 4, 0, 1, seed=8), 20)
    assert a == b and a != c
    epoch0, epoch1 = a[:10], a[10:]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == list(range(40))
    assert epoch0 != epoch1


@pytest.mark.parametrize("drop_last", [True, False])
def test_dp2_covers_every_pair_once_per_epoch(drop_last):
    n, gbs, mbs = 48 if drop_last else 50, 12, 3
    samplers = [PreferenceSampler(n, gbs, mbs, r, 2, seed=1, drop_last=drop_last) for r in (0, 1)]
    per_rank = samplers[0].samples_per_epoch // (mbs * 2)
    for epoch in range(2):
        batches = [take(s, per_rank * (epoch + 1))[per_rank * epoch :] for s in samplers]
        assert all(len(b) == mbs for rank in batches for b in rank)
        seen = Counter(i for rank in batches for b in rank for i in b)
        assert set(seen) == set(range(n))  # every pair, whole pairs only
        if drop_last:
            assert set(seen.values()) == {1}
        else:  # 50 pairs fill 5 batches of 12 = 60 slots: 10 pairs wrap around
            assert sum(seen.values()) == 60 and max(seen.values()) == 2
        # The two ranks never share a pair inside a step.
        for b0, b1 in zip(*batches, strict=True):
            assert not set(b0) & set(b1)


def test_exact_resume_from_consumed_samples_across_epochs():
    args = dict(num_pairs=30, global_batch_size=8, micro_batch_size=2, dp_size=2, seed=3)
    for rank in (0, 1):
        full = take(PreferenceSampler(dp_rank=rank, **args), 40)
        for steps in (1, 3, 4, 5, 9):  # 3 global batches per epoch: crosses epoch boundaries
            resumed = PreferenceSampler(dp_rank=rank, consumed_samples=steps * 8, **args)
            assert take(resumed, 40 - 2 * steps) == full[2 * steps :]


def test_consumed_samples_tracks_progress():
    s = PreferenceSampler(16, 8, 2, 0, 2, seed=0)
    it = iter(s)
    next(it)
    assert s.consumed_samples == 4  # mbs * dp pairs consumed over all ranks
    next(it), next(it)
    assert s.consumed_samples == 12 and s.epoch == 0
    next(it)
    assert s.consumed_samples == 16 and s.epoch == 1


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        PreferenceSampler(64, 10, 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match="consumed_samples"):
        PreferenceSampler(64, 8, 2, 0, 2, seed=0, consumed_samples=6)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        PreferenceSampler(6, 8, 2, 0, 2, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        PreferenceSampler(64, 8, 2, 2, 2, seed=0)
