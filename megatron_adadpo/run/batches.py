"""The micro-batches of each step, in training order, on the training device.

Order: ``PreferenceSampler`` gives each step's global batch (reshuffled per epoch by
``train.seed``, resumable from the number of consumed pairs); ``data/batching.py`` splits it
over data-parallel ranks and micro-batches by ``data.batching`` (``fixed``, ``token_budget``,
``packed``), the same way on every rank. Shapes: each micro-batch is padded to its own longest
row rounded up to the layout's ``pad_multiple`` (pipelines too: ``variable_seq_lengths``), so the
number of micro-batches and their shapes may change from step to step; a packed micro-batch is
one row (``data/packing.py``) that reaches the attention as ``PackedSeqParams`` (Transformer
Engine) or as a block-diagonal mask (local spec, ``run/packing.py``).
With context parallelism each rank keeps its zigzag share of every per-token tensor
(``run/context_parallel.py``: of the whole row, or of each sequence of a packed row), ``[., S/CP]``;
pair ids and reference values stay per pair.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_adadpo.config import Config
from megatron_adadpo.data import PreferenceSampler, collate_pairs
from megatron_adadpo.data.batching import BatchingPolicy, plan_global_batch
from megatron_adadpo.data.packing import collate_packed
from megatron_adadpo.platform.machine import torch_device
from megatron_adadpo.resolve import ResolvedRun
from megatron_adadpo.run.context_parallel import split_for_context_parallel
from megatron_adadpo.run.packing import thd_params


def row_lengths(dataset) -> np.ndarray:
    """int64 ``[N, 2]``: the chosen and rejected rows' token counts of every pair."""
    prompt, chosen, rejected = dataset.lengths().T
    return np.stack([prompt + chosen, prompt + rejected], axis=1)


class StepBatches:
    """Turns each global batch of the sampler into this rank's collated micro-batches.

    ``sampler`` yields whole global batches (``micro_batch_size = global_batch_size``, one DP
    rank); ``step_lengths`` holds the row lengths ``[G, 2]`` of the last one (all ranks' pairs:
    the step's useful FLOPs).
    """

    def __init__(
        self,
        dataset,
        sampler: PreferenceSampler,
        policy: BatchingPolicy,
        dp: tuple[int, int],
        cp: tuple[int, int] = (0, 1),
        thd: bool = False,
        device: str | None = None,  # the resolved run's; None: this machine's
    ):
        self.dataset, self.policy = dataset, policy
        (self.dp_rank, self.dp_size), (self.cp_rank, self.cp_size) = dp, cp
        self.thd = thd  # packed rows go to Transformer Engine as PackedSeqParams
        self.lengths = row_lengths(dataset)
        self.device = torch_device(device)
        self.step_lengths = np.zeros((0, 2), dtype=np.int64)
        self.step_micro_batches = 0
        self.sampler = sampler
        self._indices = iter(sampler)

    def next_step(self) -> list[dict]:
        """This rank's micro-batches of the next global batch (tensors on the device)."""
        indices = next(self._indices)
        self.step_lengths = self.lengths[indices]
        plan = plan_global_batch(self.policy, self.step_lengths, self.dp_size)
        self.step_micro_batches = max(len(m) for m in plan)  # the most any DP rank has
        return [self._collate([self.dataset[indices[p]] for p in m]) for m in plan[self.dp_rank]]

    def _collate(self, examples: list[dict]) -> dict:
        pad_id, multiple = self.dataset.pad_id, self.policy.pad_multiple
        if self.policy.mode == "packed":
            batch = collate_packed(examples, pad_id, multiple, self.policy.segment_multiple)
        else:
            batch = collate_pairs(examples, pad_id, multiple)
        batch = split_for_context_parallel(batch, self.cp_rank, self.cp_size)
        batch = _to_device(batch, self.device)
        if self.thd:
            batch["packed_seq_params"] = thd_params(batch)
        return batch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_batches(
    config: Config,
    run: ResolvedRun,
    dataset,
    dp: tuple[int, int],
    consumed_samples: int,
    drop_last: bool = True,
    *,
    cp: tuple[int, int],
) -> StepBatches:
    """Training order from ``consumed_samples`` on, batched as ``run`` resolved it, for DP rank
    ``dp = (rank, size)`` and CP rank ``cp = (rank, size)`` (required, so that no caller forgets
    the context-parallel split: the same pairs, this rank's positions); ``drop_last=False``
    visits every pair, completing the last global batch by wrapping around (evaluation,
    reference precompute)."""
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
    thd = run.batching.packing == "thd"
    return StepBatches(dataset, sampler, run.batching.policy, dp, cp, thd, run.device)
