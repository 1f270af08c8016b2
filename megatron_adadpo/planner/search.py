"""Search layouts that fit: TP within a node, PP dividing the layers, VPP, recompute, micro-batch.

The search keeps the model, sequence length, precision, reference mode, context parallelism and
cluster of the input; it turns on the distributed optimizer and sequence parallelism (TP > 1),
and ranks fitting layouts by a relative step-time score:

    (1 + pipeline bubble) * (1 + 1/3 with full recompute) * (1 + 0.05 * log2 TP)
    * (1 + 0.01 * (VPP - 1))

(bubble ``(PP-1)/(VPP*M)``; the TP and VPP terms stand for exposed communication). Ties go to
fewer model-parallel GPUs, then to less memory. A heuristic ranking, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math

from megatron_adadpo.planner.inputs import Cluster, LayoutError, PlanInput
from megatron_adadpo.planner.plan import Plan, make_plan


def score(plan: Plan) -> float:
    x = plan.input.execution
    s = 1 + plan.cost.pipeline_bubble
    s *= 1 + (1 / 3 if x.recompute == "full" else 0)
    s *= 1 + 0.05 * math.log2(x.tp)
    s *= 1 + 0.01 * ((x.vpp or 1) - 1)
    return s


def candidates(p: PlanInput, cluster: Cluster):
    """Every layout the search considers for ``p`` on ``cluster`` (not yet checked)."""
    m, world = p.model, cluster.world_size
    tps = [t for t in (1, 2, 4, 8, 16) if t <= cluster.gpus_per_node]
    for tp in tps:
        for pp in (d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0):
            if world % (tp * pp * p.execution.cp):
                continue
            per_stage = m.num_layers // pp
            vpps = [None] + [v for v in range(2, per_stage + 1) if per_stage % v == 0] * (pp > 1)
            for vpp in vpps:
                for recompute in (None, "selective", "full"):
                    execution = dataclasses.replace(
                        p.execution,
                        tp=tp,
                        pp=pp,
                        vpp=vpp,
                        recompute=recompute,
                        sequence_parallel=tp > 1,
                        recompute_num_layers=1,
                    )
                    for mbs in sorted({1, p.micro_batch_size}):
                        yield p.replace(
                            execution=execution, micro_batch_size=mbs, distributed_optimizer=True
                        )


def suggest(p: PlanInput, cluster: Cluster, mfu: float | None = None, limit: int = 3) -> list[Plan]:
    """Up to ``limit`` layouts of ``p`` that fit ``cluster``, best first (see ``score``)."""
    fitting = []
    for cand in candidates(p, cluster):
        try:
            plan = make_plan(cand, cluster, mfu)
        except LayoutError:
            continue
        if plan.fits:
            fitting.append(plan)
    # CP is the input's for every candidate, so TP*PP*CP orders as TP*PP.
    fitting.sort(
        key=lambda pl: (score(pl), pl.input.execution.model_parallel_size, pl.peak.reserved)
    )
    return fitting[:limit]


def min_nodes(p: PlanInput, cluster: Cluster, mfu: float | None = None, max_nodes: int = 256):
    """The smallest power-of-two node count (>= the cluster's) with a fitting layout."""
    nodes = cluster.nodes
    while nodes <= max_nodes:
        trial = Cluster(cluster.gpu, nodes, cluster.gpus_per_node)
        found = suggest(p, trial, mfu, limit=1)
        if found:
            return nodes, found[0]
        nodes *= 2
    return None, None
