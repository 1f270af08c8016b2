"""How a run writes its checkpoints: fully parallel or not, synchronously or in the background.

``CheckpointWriter.write`` saves a sharded state dict with ``dist_checkpointing.save`` into a
``iter_N.partial`` directory and calls ``publish`` (rename it to ``iter_N``, move ``latest``:
``run/state/run_dir.py``) on rank 0 only once the write is complete on every rank:

- synchronous (default): after the write and a barrier;
- ``checkpoint.async_save``: Megatron's async save. ``dist_checkpointing.save(...,
  async_sharded_save=True)`` plans the write and returns an ``AsyncRequest`` whose tensors a
  forked process writes while training goes on (megatron-core 0.16.1 / 0.19
  ``strategies/async_utils.py``: ``TemporalAsyncCaller`` forks after staging the tensors on the
  host, so the process writes the state of the moment of the save). It is scheduled on
  Megatron's ``AsyncCallsQueue``; ``poll`` (once per step, collective) finalises it once every
  rank's writer has exited (``is_current_async_call_done``: an all-reduce of "still writing").
  Finalising runs Megatron's finalize functions first (gather the write results, rank 0 writes
  ``.metadata`` and ``metadata.json``, barrier), then ``publish`` and a barrier. This is
  Megatron-LM's ``schedule_async_save`` / ``maybe_finalize_async_save``
  (megatron/training/async_utils.py), its tracker-file update (``iter_finalize_fn`` in
  megatron/training/checkpointing.py) replaced by the atomic publish. At most one write is in
  flight: a new save, the end of training and a SIGTERM stop wait for it (``wait``).

A crash while a write is in flight leaves ``iter_N.partial`` unpublished (the writer dies with
its rank: ``platform/processes.py``), so ``latest`` still names the previous complete checkpoint.

``checkpoint.fully_parallel`` (default on, as Megatron-LM's ``--ckpt-fully-parallel-save``)
spreads the writes of tensors replicated over the DP x CP group across its ranks
(``platform.megatron.fully_parallel_save_strategy``); loads are spread the same way
(``platform/safe_dcp.py``: ``load``'s ``parallel_group``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from megatron_adadpo.platform.megatron import (
    ASYNC_SAVE_ARGUMENTS,
    AsyncCallsQueue,
    dist_checkpointing,
    fully_parallel_save_strategy,
    parallel_state,
)


def checkpoint_group(fully_parallel: bool):
    """The group a fully-parallel save or load spreads over (Megatron-LM: the data-parallel
    group with context parallelism), or None when ``checkpoint.fully_parallel`` is off."""
    if not fully_parallel or not dist.is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


class CheckpointWriter:
    """Writes checkpoints with the run's strategy; holds the asynchronous write in flight."""

    def __init__(self, fully_parallel: bool = False, async_save: bool = False):
        group = checkpoint_group(fully_parallel)
        self.strategy = fully_parallel_save_strategy(group) if group is not None else None
        self.queue = AsyncCallsQueue() if async_save else None

    def write(
        self,
        state: dict,
        directory: Path,
        content_metadata: dict,
        write_files: Callable[[], None],
        publish: Callable[[], None],
    ) -> None:
        """Collective: save ``state`` into ``directory``, then ``write_files()`` (this rank's
        extra files), then ``publish()`` on rank 0 once every rank's write is complete: now,
        or (async) when ``poll`` / ``wait`` finalises the write. Call ``wait`` before preparing
        ``directory``: one write in flight, published before its successor starts."""
        request = dist_checkpointing.save(
            state,
            str(directory),
            sharded_strategy=self.strategy,
            content_metadata=content_metadata,
            async_sharded_save=self.queue is not None,
            **ASYNC_SAVE_ARGUMENTS,
        )
        write_files()

        def finalize() -> None:  # every rank, after every rank's write is complete
            if _rank() == 0:
                publish()
            _barrier()

        if request is None:
            _barrier()
            finalize()
        else:
            request.add_finalize_fn(finalize)
            self.queue.schedule_async_request(request)

    @property
    def pending(self) -> bool:
        """A write is in flight (the same answer on every rank)."""
        return self.queue is not None and self.queue.get_num_unfinalized_calls() > 0

    def poll(self) -> None:
        """Collective while a write is pending: publish it if every rank's writer is done."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Collective while a write is pending: wait for it on every rank and publish it."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
