"""One layout's plan: checks, memory per pipeline rank, step cost, verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_adadpo.layout import data_parallel_size
from megatron_adadpo.planner.inputs import (
    Cluster,
    PlanInput,
    check_layout,
    make_cluster,
    num_micro_batches,
    plan_input,
    read_recipe,
)
from megatron_adadpo.planner.memory import GIB, StageMemory, memory_plan
from megatron_adadpo.planner.params import total_params
from megatron_adadpo.planner.throughput import StepCost, step_cost

WARN_FRACTION = 0.9  # warn when the peak uses more than this share of the GPU's memory


@dataclass(frozen=True)
class Plan:
    """The planner's answer for one layout on one cluster."""

    input: PlanInput
    cluster: Cluster
    dp: int
    num_micro: int
    stages: list[StageMemory]
    cost: StepCost
    warnings: list[str] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        """The pipeline rank with the largest reserved memory (the one that decides the fit)."""
        return max(self.stages, key=lambda s: s.reserved)

    @property
    def capacity(self) -> float:
        return self.cluster.gpu.memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.peak.reserved <= self.capacity

    @property
    def total_params(self) -> int:
        return total_params(self.input.model, self.input.execution.tp)

    def to_dict(self) -> dict:
        p, c = self.input, self.cluster
        e = p.execution
        return {
            "model": p.model.to_dict() | {"total_params": self.total_params},
            "cluster": {
                "gpu": c.gpu.key,
                "gpu_name": c.gpu.name,
                "nodes": c.nodes,
                "gpus_per_node": c.gpus_per_node,
                "world_size": c.world_size,
                "memory_gib": c.gpu.memory_gib,
            },
            "layout": {
                "tp": e.tp,
                "pp": e.pp,
                "vpp": e.vpp,
                "cp": e.cp,
                "dp": self.dp,
                "sequence_parallel": e.sequence_parallel,
                "recompute": e.recompute,
                "recompute_num_layers": e.recompute_num_layers,
                "bf16": e.bf16,
                "fp8": e.fp8,
                "distributed_optimizer": p.distributed_optimizer,
                "reference": p.reference,
                "micro_batch_size": p.micro_batch_size,
                "global_batch_size": p.global_batch_size,
                "seq_length": p.seq_length,
                "num_micro_batches": self.num_micro,
            },
            "memory_per_stage": [s.to_dict() for s in self.stages],
            "peak_stage": self.peak.pp_rank,
            "peak_allocated_gib": self.peak.allocated / GIB,
            "peak_reserved_gib": self.peak.reserved / GIB,
            "fits": self.fits,
            "step": self.cost.to_dict(),
            "warnings": list(self.warnings),
        }


def make_plan(p: PlanInput, cluster: Cluster, mfu: float | None = None) -> Plan:
    """Plan ``p`` on ``cluster``; raises ``LayoutError`` with every reason it cannot run."""
    warnings = check_layout(p, cluster)
    dp = data_parallel_size(p.execution, cluster.world_size)
    micro = num_micro_batches(p, cluster)
    stages = memory_plan(p, dp, micro)
    cost = step_cost(p, cluster.gpu, cluster.world_size, micro, mfu)
    plan = Plan(p, cluster, dp, micro, stages, cost, warnings)
    used = plan.peak.reserved / plan.capacity
    if WARN_FRACTION < used <= 1:
        warnings.append(
            f"the peak uses {used:.0%} of {cluster.gpu.name} memory: little headroom "
            "for longer-than-planned sequences or allocator fragmentation"
        )
    return plan


def load(
    recipe: str | None,
    overrides: list[str] = (),
    gpu: str = "h100",
    nodes: int = 1,
    gpus_per_node: int = 8,
    gpus: int | None = None,
) -> tuple[PlanInput, Cluster]:
    """Read and validate a recipe (+ ``--set`` overrides) and describe the cluster.

    Raises ``LayoutError`` with the config's message when the recipe is invalid.
    """
    return plan_input(read_recipe(recipe, list(overrides))), make_cluster(
        gpu, nodes, gpus_per_node, gpus
    )
