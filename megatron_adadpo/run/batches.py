"""The micro-batches of each step, in training order, on the training device.

Order: ``PreferenceSampler`` gives each step's global batch (reshuffled per epoch by
``train.seed``, resumable from the number of consumed pairs); ``data/batching.py`` splits it
over data-parallel ranks and micro-batches by ``data.batching`` (``fixed``, ``token_budget``,
``packed``), the same way on every rank. Shapes: each micro-batch is padded to its own longest
row rounded up to the layout's ``pad_multiple`` (pipelines too: ``variable_seq_lengths``), so the
number of micro-batches and their shapes may change from step to step; a packed micro-batch is
one row (``data/packing.py``) that reaches the attention as ``PackedSeqParams`` (Transformer
Engine) or as a block-diagonal mask (``resolve/batching.packing_format`` decides). Each collated
micro-batch becomes a ``MicroBatch`` here, once (``run/microbatch.py``); with context
parallelism each rank keeps its zigzag share of every per-token tensor (of the whole row, or
of each sequence of a packed row), ``[., S/CP]``; pair ids and reference values stay per pair.
Under a pipeline the packed rows of a step all have the step's longest row's length (fixed shapes,
``BatchingPolicy.step_row_tokens``).
"""

from __future__ import annotations

import numpy as np

from megatron_adadpo.config import Config
from megatron_adadpo.data import PreferenceSampler, collate_pairs
from megatron_adadpo.data.batching import BatchingPolicy, plan_global_batch
from megatron_adadpo.data.packing import collate_packed
from megatron_adadpo.platform.machine import torch_device
from megatron_adadpo.platform.parallel import Parallel
from megatron_adadpo.resolve import ResolvedRun
from megatron_adadpo.run.microbatch import MicroBatch, PackedAttention


def row_lengths(dataset) -> np.ndarray:
    """int64 ``[N, 2]``: the chosen and rejected rows' token counts of every pair."""
    prompt, chosen, rejected = dataset.lengths().T
    return np.stack([prompt + chosen, prompt + rejected], axis=1)


class StepBatches:
    """Turns each global batch of the sampler into this rank's collated micro-batches.

    ``sampler`` yields whole global batches (``micro_batch_size = global_batch_size``, one DP
    rank); ``step_lengths`` holds the row lengths ``[G, 2]`` of the last one (all ranks' pairs:
    the step's useful FLOPs). ``parallel`` gives this rank's data-parallel share and
    context-parallel positions; ``packing`` how packed rows reach attention (None: not packed).
    """

    def __init__(
        self,
        dataset,
        sampler: PreferenceSampler,
        policy: BatchingPolicy,
        parallel: Parallel,
        packing: PackedAttention | None = None,
        device: str | None = None,  # the resolved run's; None: this machine's
    ):
        self.dataset, self.policy, self.parallel = dataset, policy, parallel
        self.packing = packing
        self.lengths = row_lengths(dataset)
        self.device = torch_device(device)
        self.step_lengths = np.zeros((0, 2), dtype=np.int64)
        self.step_micro_batches = 0
        self.sampler = sampler
        self._indices = iter(sampler)

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch (tensors on the device)."""
        indices = next(self._indices)
        self.step_lengths = self.lengths[indices]
        dp = self.parallel
        plan = plan_global_batch(self.policy, self.step_lengths, dp.dp_size)
        self.step_micro_batches = max(len(m) for m in plan)  # the most any DP rank has
        mine = plan[dp.dp_rank]
        row = self.policy.step_row_tokens(self.step_lengths, mine)
        return [self._collate([self.dataset[indices[p]] for p in m], row) for m in mine]

    def _collate(self, examples: list[dict], row_tokens: int | None) -> MicroBatch:
        """``row_tokens``: the packed row's length (pipelines: the step's one shape; every row
        of the step fits in it, so padding to a multiple of it pads to exactly it)."""
        pad_id, multiple = self.dataset.pad_id, self.policy.pad_multiple
        if self.packing is not None:
            rows = row_tokens or multiple
            rows = collate_packed(examples, pad_id, rows, self.policy.segment_multiple)
        else:
            rows = collate_pairs(examples, pad_id, multiple)
        batch = MicroBatch.from_collated(rows, self.packing)
        batch = batch.on_cp_rank(self.parallel.cp_rank, self.parallel.cp_size)
        return batch.to(self.device)


def step_batches(
    config: Config,
    run: ResolvedRun,
    dataset,
    parallel: Parallel,
    consumed_samples: int,
    drop_last: bool = True,
) -> StepBatches:
    """Training order from ``consumed_samples`` on, batched as ``run`` resolved it, for this
    rank of ``parallel`` (its data-parallel share of each global batch, its context-parallel
    positions); ``drop_last=False`` visits every pair, completing the last global batch by
    wrapping around (evaluation, reference precompute)."""
    sampler = PreferenceSampler(
        num_pairs=len(dataset),
        global_batch_size=config.train.global_batch_size,
        micro_batch_size=config.train.global_batch_size,
        dp_rank=0,
        dp_size=1,
        seed=config.train.seed,
        consumed_samples=consumed_samples,
        shuffle=True,
        drop_last=drop_last,
    )
    policy, packing = run.batching.policy, run.batching.packing
    return StepBatches(dataset, sampler, policy, parallel, packing, run.device)
