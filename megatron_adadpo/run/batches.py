"""The micro-batches of each step, in training order, on the training device.

Order: ``PreferenceSampler`` gives each step's global batch (reshuffled per epoch by
``train.seed``, resumable from the number of consumed pairs); ``data/batching.py`` splits it
over data-parallel ranks and micro-batches by ``data.batching`` (``fixed``, ``token_budget``,
``packed``), the same way on every rank. Shapes: each micro-batch is padded to its own longest
row rounded up to the layout's ``pad_multiple`` (pipelines too: ``variable_seq_lengths``), so the
number of micro-batches and their shapes may change from step to step; a packed micro-batch is
one row (``data/packing.py``) that reaches the attention as ``PackedSeqParams`` (Transformer
Engine) or as a block-diagonal mask (local spec, ``run/packing.py``); under a pipeline the
packed rows of a step all have the step's longest row's length (fixed shapes,
``BatchingPolicy.step_row_tokens``).
With context parallelism each rank keeps its zigzag share of every per-token tensor
(``run/context_parallel.py``: of the whole row, or of each sequence of a packed row), ``[., S/CP]``;
pair ids and reference values stay per pair.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_adadpo.config import Config
from megatron_adadpo.data import PreferenceSampler, collate_pairs
from megatron_adadpo.data.batching import BatchingPolicy, batching_policy, plan_global_batch
from megatron_adadpo.data.packing import collate_packed
from megatron_adadpo.run.context_parallel import split_for_context_parallel
from megatron_adadpo.run.packing import packs_as_thd, thd_params


def training_device() -> torch.device:
    """The current CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    ):
        self.dataset, self.policy = dataset, policy
        (self.dp_rank, self.dp_size), (self.cp_rank, self.cp_size) = dp, cp
        self.thd = thd  # packed rows go to Transformer Engine as PackedSeqParams
        self.lengths = row_lengths(dataset)
        self.device = training_device()
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
        mine = plan[self.dp_rank]
        row = self.policy.step_row_tokens(self.step_lengths, mine)
        return [self._collate([self.dataset[indices[p]] for p in m], row) for m in mine]

    def _collate(self, examples: list[dict], row_tokens: int | None) -> dict:
        """``row_tokens``: the packed row's length (pipelines: the step's one shape; every row
        of the step fits in it, so padding to a multiple of it pads to exactly it)."""
        pad_id, multiple = self.dataset.pad_id, self.policy.pad_multiple
        if self.policy.mode == "packed":
            rows = row_tokens or multiple
            batch = collate_packed(examples, pad_id, rows, self.policy.segment_multiple)
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
    dataset,
    dp: tuple[int, int],
    consumed_samples: int,
    drop_last: bool = True,
    *,
    cp: tuple[int, int],
) -> StepBatches:
    """Training order from ``consumed_samples`` on, for DP rank ``dp = (rank, size)`` and CP
    rank ``cp = (rank, size)`` (required, so that no caller forgets the context-parallel split:
    the same pairs, this rank's positions); ``drop_last=False`` visits every pair, completing
    the last global batch by wrapping around (evaluation, reference precompute)."""
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
    data = config.data
    policy = batching_policy(
        data.batching,
        data.max_tokens_per_micro_batch,
        config.execution,
        config.train.micro_batch_size,
    )
    thd = policy.mode == "packed" and packs_as_thd(config.execution)
    return StepBatches(dataset, sampler, policy, dp, cp, thd)
