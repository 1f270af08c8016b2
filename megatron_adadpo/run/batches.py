"""The micro-batches of each step, in training order, on the training device.

Order: ``PreferenceSampler`` (reshuffled per epoch by ``train.seed``, resumable from the number
of consumed pairs, split over data-parallel ranks). Shapes: each micro-batch is padded to its
longest row rounded up to the layout's ``pad_multiple``; with pipeline parallelism every
micro-batch has ``data.max_length`` tokens, because Megatron's p2p buffers have a fixed shape.
With context parallelism each rank keeps its zigzag share of every per-token tensor
(``run/context_parallel.py``), ``[2B, S/CP]``; pair ids and reference values stay per pair.
"""

from __future__ import annotations

import torch

from megatron_adadpo.config import Config
from megatron_adadpo.data import PreferenceSampler, collate_pairs
from megatron_adadpo.run.context_parallel import split_for_context_parallel


def training_device() -> torch.device:
    """The current CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StepBatches:
    """Turns sampler index lists into collated micro-batches on the training device, each cut
    to this context-parallel rank's share."""

    def __init__(
        self,
        dataset,
        sampler: PreferenceSampler,
        pad_multiple: int,
        fixed_length,
        cp_rank: int = 0,
        cp_size: int = 1,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.pad_multiple = pad_multiple
        self.fixed_length = fixed_length
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.device = training_device()
        self._indices = iter(sampler)

    @property
    def num_microbatches(self) -> int:
        return self.sampler.num_microbatches

    def next_step(self) -> list[dict]:
        """This rank's micro-batches of the next global batch (tensors on the device)."""
        out = []
        for _ in range(self.sampler.num_microbatches):
            examples = [self.dataset[i] for i in next(self._indices)]
            batch = collate_pairs(
                examples, self.dataset.pad_id, self.pad_multiple, self.fixed_length
            )
            batch = {k: v.to(self.device) for k, v in batch.items() if v is not None}
            out.append(split_for_context_parallel(batch, self.cp_rank, self.cp_size))
        return out


def step_batches(
    config: Config,
    dataset,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    drop_last: bool = True,
    *,
    cp_rank: int,
) -> StepBatches:
    """Training order from ``consumed_samples`` on; ``drop_last=False`` visits every pair,
    completing the last global batch by wrapping around (evaluation, reference precompute).

    ``cp_rank``: this rank's place in its context-parallel group (of ``execution.cp`` ranks;
    required, so that no caller forgets the split: the same pairs, this rank's positions).
    """
    execution = config.execution
    sampler = PreferenceSampler(
        num_pairs=len(dataset),
        global_batch_size=config.train.global_batch_size,
        micro_batch_size=config.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=config.train.seed,
        consumed_samples=consumed_samples,
        shuffle=True,
        drop_last=drop_last,
    )
    fixed_length = config.data.max_length if execution.pp > 1 else None
    return StepBatches(
        dataset, sampler, execution.pad_multiple, fixed_length, cp_rank, execution.cp
    )
