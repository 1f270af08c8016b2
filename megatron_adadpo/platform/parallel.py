"""The run's parallel state as one value: degrees, process groups and this rank's coordinates.

Built once per run from Megatron's initialised parallel state
(``platform.distributed.init_model_parallel`` returns it) and passed to everything that needs a
group, a size or a rank: the step and log-prob code, the batcher (this rank's data-parallel
share and context-parallel positions), the evaluator and the logging choice. Nothing in
``run/`` reads Megatron's global ``parallel_state`` or asks a group for its size again.

The groups keep Megatron's names (``ProcessGroupCollection``: ``tp``, ``pp``, ``cp``, ``dp``,
``dp_cp``); ``X_size`` is the degree and ``X_rank`` this rank's coordinate in group ``X``
(torchtitan's ``ParallelDims`` with the groups and coordinates kept beside the degrees).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_adadpo.platform.megatron import ProcessGroupCollection, process_groups


@dataclass(frozen=True)
class Parallel:
    """Degrees, groups and coordinates of this rank (``world = tp * pp * cp * dp``)."""

    tp: dist.ProcessGroup  # the process groups, with Megatron's names
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup  # data x context parallel (the gradient reduction's group)
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    vpp: int | None  # virtual pipeline stages per rank (None: not interleaved)
    rank: int  # in the default group
    world_size: int

    @classmethod
    def from_groups(cls, groups: ProcessGroupCollection, vpp: int | None = None) -> Parallel:
        """The value of Megatron's groups (each asked once for this rank's place in it)."""
        names = ("tp", "pp", "cp", "dp")
        sizes = {f"{n}_size": dist.get_world_size(getattr(groups, n)) for n in names}
        ranks = {f"{n}_rank": dist.get_rank(getattr(groups, n)) for n in names}
        pgs = {n: getattr(groups, n) for n in (*names, "dp_cp")}
        world = dist.get_world_size()
        return cls(**pgs, **sizes, **ranks, vpp=vpp, rank=dist.get_rank(), world_size=world)

    @classmethod
    def current(cls, vpp: int | None = None) -> Parallel:
        """The value of the initialised Megatron parallel state (``init_model_parallel`` has
        run)."""
        return cls.from_groups(process_groups(), vpp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """The last pipeline stage (of the physical pipeline): where the loss is computed."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """Last pipeline stage, first TP / CP / DP rank: where the reduced loss metrics live."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0
