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
