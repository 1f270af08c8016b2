"""Deterministic, data-parallel-aware sampler over whole preference pairs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PreferenceSampler:
    """Yields, for one DP rank, one list of `micro_batch_size` pair indices per micro-batch.

    Batch sizes count PAIRS (a pair is two sequences: chosen and rejected).
    `global_batch_size = micro_batch_size * dp_size * num_microbatches`.

    Order. Epoch `e` visits `permutation(seed + e)` of `range(num_pairs)` (identity order
    when `shuffle=False`). Global batch `g` of the epoch is `order[g*G : (g+1)*G]`; inside it,
    micro-batch `m` of rank `r` is the slice starting at `(m * dp_size + r) * micro_batch_size`,
    i.e. each step of `micro_batch_size * dp_size` pairs is split across ranks contiguously, as
    Megatron's `MegatronPretrainingSampler` does. A pair is never split across ranks or
    micro-batches (its chosen and rejected rows are collated together).

    Epoch length. `drop_last=True`: `floor(num_pairs / G) * G` pairs, the shuffled tail is left
    out (a different tail every epoch). `drop_last=False`: `ceil(num_pairs / G) * G`; the last
    global batch is completed with the first pairs of the same epoch's order, so every pair is
    seen at least once per epoch and shapes stay fixed.

    Resume. `consumed_samples` counts pairs over all DP ranks (Megatron's convention, advanced
    by G per step); iteration restarts exactly at that point (epoch and offset derived from it).
    The iterator is infinite: it moves on to the next epoch; the trainer decides when to stop.

    Args:
        num_pairs: Pairs in the dataset.
        global_batch_size: Pairs per optimizer step over all DP ranks.
        micro_batch_size: Pairs per micro-batch on one rank.
        dp_rank: This rank's data-parallel rank.
        dp_size: Data-parallel world size.
        seed: Base seed of the per-epoch shuffle.
        consumed_samples: Pairs already consumed by all ranks (multiple of mbs * dp_size).
        shuffle: Reshuffle every epoch.
        drop_last: See "Epoch length".
    """

    def __init__(
        self,
        num_pairs: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        step = micro_batch_size * dp_size
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError("micro_batch_size and dp_size must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        if global_batch_size < step or global_batch_size % step:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"micro_batch_size * dp_size = {step}"
            )
        if num_pairs < 1 or (drop_last and num_pairs < global_batch_size):
            raise ValueError(
                f"{num_pairs} pairs do not fill one global batch of {global_batch_size} pairs with "
                "drop_last=True: lower global_batch_size or add data"
            )
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * dp_size = {step}"
            )
        self.num_pairs = num_pairs
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle
        self.drop_last = drop_last

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per global batch on each rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def global_batches_per_epoch(self) -> int:
        n, g = self.num_pairs, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    @property
    def samples_per_epoch(self) -> int:
        """Pairs consumed (over all ranks) by one epoch."""
        return self.global_batches_per_epoch * self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next micro-batch belongs to."""
        return self.consumed_samples // self.samples_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All pair indices one epoch visits, in order (int64 `[samples_per_epoch]`)."""
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_pairs)
        else:
            order = np.arange(self.num_pairs)
        # drop_last=False: np.resize wraps around within the epoch's own order.
        return np.resize(order, self.samples_per_epoch).astype(np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        while True:
            epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
            order = self.epoch_order(epoch)
            for start in range(offset, len(order), step):
                lo = start + self.dp_rank * self.micro_batch_size
                batch = order[lo : lo + self.micro_batch_size].tolist()
                self.consumed_samples = start + step + epoch * self.samples_per_epoch
                yield batch
