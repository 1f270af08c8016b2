"""``Parallel`` (``platform/parallel.py``): the one parallel value, built on 2 gloo ranks.

Each layout splits one dimension over the two ranks, so the expected degrees and coordinates
are known without the groups (rank ``r`` is coordinate ``r`` of the split dimension, 0 of the
others); an all-reduce over each group counts the ranks it reaches, and the groups must be
Megatron's own (the ones its layers and schedules reduce over).
"""

from __future__ import annotations

import pytest
import torch

from megatron_adadpo.layout import ExecutionConfig
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

# layout on 2 ranks -> the degree that is 2 (the others are 1)
LAYOUTS = {"tp2": dict(tp=2), "cp2": dict(cp=2), "pp2": dict(pp=2), "dp2": {}}


def _build(rank, world, layout: dict):
    import torch.distributed as dist

    from megatron_adadpo.platform.distributed import init_model_parallel
    from megatron_adadpo.platform.megatron import parallel_state

    parallel = init_model_parallel(ExecutionConfig(**layout))
    same_groups = {
        "tp": parallel.tp is parallel_state.get_tensor_model_parallel_group(),
        "pp": parallel.pp is parallel_state.get_pipeline_model_parallel_group(),
        "cp": parallel.cp is parallel_state.get_context_parallel_group(),
        "dp": parallel.dp is parallel_state.get_data_parallel_group(),
        "dp_cp": parallel.dp_cp
        is parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    # a collective over each group reaches exactly the ranks of its degree
    reached = {}
    for name in ("tp", "pp", "cp", "dp"):
        flag = torch.ones(1)
        dist.all_reduce(flag, group=getattr(parallel, name))
        reached[name] = int(flag.item())
    values = {
        n: getattr(parallel, n)
        for n in ("rank", "world_size", "vpp", "is_first_stage", "is_last_stage")
    }
    values["is_logging_rank"] = parallel.is_logging_rank
    for name in ("tp", "pp", "cp", "dp"):
        values[f"{name}_size"] = getattr(parallel, f"{name}_size")
        values[f"{name}_rank"] = getattr(parallel, f"{name}_rank")
    return values, same_groups, reached


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_degrees_coordinates_and_groups_on_two_ranks(name):
    split = {"tp2": "tp", "cp2": "cp", "pp2": "pp", "dp2": "dp"}[name]
    for rank, (values, same_groups, reached) in enumerate(run_ranks(_build, 2, LAYOUTS[name])):
        assert all(same_groups.values()), same_groups
        for dim in ("tp", "pp", "cp", "dp"):
            degree = 2 if dim == split else 1
            assert values[f"{dim}_size"] == degree == reached[dim], (rank, dim)
            assert values[f"{dim}_rank"] == (rank if dim == split else 0), (rank, dim)
        assert values["rank"] == rank and values["world_size"] == 2 and values["vpp"] is None
        pipelined = split == "pp"
        assert values["is_first_stage"] == (not pipelined or rank == 0)
        assert values["is_last_stage"] == (not pipelined or rank == 1)
        # the reduced metrics live on the last stage's first TP / CP / DP rank: exactly one
        logging = rank == 1 if pipelined else rank == 0
        assert values["is_logging_rank"] == logging, rank


def _reopen(rank, world, rounds: int):
    """Open Megatron's groups ``rounds`` times in one process, cycling the layouts, and count
    torch's registered groups and this process's threads after each (gloo keeps threads per
    group); every round's groups must still reduce across the ranks they name."""
    import os

    import torch.distributed as dist

    from megatron_adadpo.platform.distributed import init_model_parallel

    layouts = [LAYOUTS[name] for name in sorted(LAYOUTS)]
    counts = []
    for i in range(rounds):
        parallel = init_model_parallel(ExecutionConfig(**layouts[i % len(layouts)]))
        flag = torch.ones(1)
        dist.all_reduce(flag, group=parallel.dp_cp)
        dist.all_reduce(flag, group=parallel.tp)
        counts.append(
            (
                len(dist.distributed_c10d._world.pg_map),
                len(os.listdir("/proc/self/task")),
                int(flag.item()),
            )
        )
    return counts


def test_reopening_the_groups_does_not_leak_them():
    """A process that opens run after run (the miniature grid's workers, a sweep, the tests)
    holds one run's groups, not every run's: without destroying the groups Megatron's
    ``destroy_model_parallel`` forgets, each re-open added 17 groups and 51 threads (measured,
    one rank); here each layout's second opening holds what its first did."""
    rounds = 8
    for rank, counts in enumerate(run_ranks(_reopen, 2, rounds)):
        groups = [c[0] for c in counts]
        threads = [c[1] for c in counts]
        reached = [c[2] for c in counts]
        # the same layout opened again holds as many groups, and no more threads, as the first time
        n = len(LAYOUTS)
        assert groups[n:] == groups[: rounds - n], (rank, groups)
        again = zip(threads[: rounds - n], threads[n:], strict=True)
        assert all(b <= a + 4 for a, b in again), (rank, threads)
        # a one summed over dp_cp (2 ranks on cp2 / dp2), then over tp (2 on tp2)
        expected = [2 if name in ("cp2", "dp2", "tp2") else 1 for name in sorted(LAYOUTS)]
        assert reached == (expected * rounds)[:rounds], (rank, reached)
