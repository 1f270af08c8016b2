"""One layout's plan: checks, memory per pipeline rank, step cost, verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_adadpo.data.length_profile import load_profile
from megatron_adadpo.planner.batching import BatchingEstimate, estimate_batching
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
from megatron_adadpo.resolve import resolve

WARN_FRACTION = 0.9  # warn when the peak uses more than this share of the GPU's memory


@dataclass(frozen=True)
class Plan:
    """The planner's answer for one layout on one cluster."""

    input: PlanInput
    cluster: Cluster
    dp: int
    num_micro: float  # micro-batches per DP rank and step (a mean under token budgets)
    stages: list[StageMemory]
    cost: StepCost
    warnings: list[str] = field(default_factory=list)
    batching: BatchingEstimate | None = None  # the policy on the length profile, if given

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
            "batching": {
                "mode": p.batching,
                "max_tokens_per_micro_batch": p.max_tokens_per_micro_batch,
                **(self.batching.to_dict() if self.batching else {}),
            },
            "warnings": list(self.warnings),
        }


def make_plan(p: PlanInput, cluster: Cluster, mfu: float | None = None) -> Plan:
    """Plan ``p`` on ``cluster``; raises ``LayoutError`` with every reason it cannot run.

    The run is the trainer's: ``resolve`` on the cluster's world size and machine (degrees,
    batching policy, settled log-prob chunk)."""
    warnings = check_layout(p, cluster)
    run = resolve(p.request(), cluster.world_size, cluster.machine)
    dp = run.parallel.dp
    rows = p.row_lengths
    if rows is None and p.batching != "fixed":  # no profile: every row avg_seq_length tokens
        check_simulated(p.global_batch_size)
        rows = np.full((p.global_batch_size, 2), p.avg_seq_length or p.seq_length)
    estimate = None
    if rows is not None:
        estimate = estimate_batching(
            run.batching.policy, rows, p.global_batch_size, dp, p.model, p.execution.tp,
            flash=p.flash_attention,
        )  # fmt: skip
    micro = estimate.micro_batches if estimate else num_micro_batches(p, cluster)
    stages = memory_plan(p, dp, max(1, round(micro)), run.step.logprob_chunk_tokens)
    cost = step_cost(p, cluster.gpu, cluster.world_size, micro, mfu, estimate)
    plan = Plan(p, cluster, dp, micro, stages, cost, warnings, estimate)
    used = plan.peak.reserved / plan.capacity
    if WARN_FRACTION < used <= 1:
        warnings.append(
            f"the peak uses {used:.0%} of {cluster.gpu.name} memory: little headroom "
            "for longer-than-planned sequences or allocator fragmentation"
        )
    return plan


PROFILE_STEPS = 8  # global batches drawn from a length profile (fewer for large ones)
MAX_SIMULATED_PAIRS = 1 << 17  # the batching policy runs on at most this many pairs (~1 min)


def check_simulated(global_batch_size: int) -> None:
    """Refuse a global batch too large to run the batching policy on (``token_budget`` /
    ``packed`` or a length profile): its pairs are simulated one by one."""
    if global_batch_size > MAX_SIMULATED_PAIRS:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is more pairs than the planner "
            f"simulates under data.batching={{token_budget, packed}} or --lengths "
            f"({MAX_SIMULATED_PAIRS:,}); plan a smaller global batch (the step time scales "
            "with it at a fixed layout)"
        )


def load(
    recipe: str | None,
    overrides: list[str] = (),
    gpu: str = "h100",
    nodes: int = 1,
    gpus_per_node: int = 8,
    gpus: int | None = None,
    lengths: str | None = None,
) -> tuple[PlanInput, Cluster]:
    """Read and validate a recipe (+ ``--set`` overrides) and describe the cluster.

    ``lengths``: a length profile (``data/length_profile.load_profile``: "ultrafeedback" or a
    preprocessed data directory) whose pairs the recipe's batching policy is planned on.
    Raises ``LayoutError`` with the config's message when the recipe is invalid.
    """
    config = read_recipe(recipe, list(overrides))
    p = plan_input(config)
    if lengths:
        data = config.data
        check_simulated(p.global_batch_size)
        profile = load_profile(lengths, data.max_length, data.max_prompt_length)
        steps = max(1, min(PROFILE_STEPS, MAX_SIMULATED_PAIRS // p.global_batch_size))
        p = p.replace(row_lengths=profile.row_lengths(steps * p.global_batch_size))
    return p, make_cluster(gpu, nodes, gpus_per_node, gpus)
