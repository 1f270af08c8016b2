"""Memory and throughput planner: will this layout fit, and how fast will it go?

No GPU or Megatron needed (torch is imported, for the config's loss validation), so it runs on
a login node before a job is queued. It reads the recipe as the trainer does (the validated
``megatron_adadpo.config.Config``) and checks layouts with the same rules
(``megatron_adadpo.layout``). Entry points: ``tools/plan.py`` (CLI), :func:`make_plan` (one
layout) and :func:`suggest` (layouts that fit).

    from megatron_adadpo.planner import load, make_plan
    p, cluster = load("examples/recipes/llama3_70b_adadpo.yaml", gpu="h100", nodes=8)
    plan = make_plan(p, cluster)   # both raise LayoutError with the reasons it cannot run
    plan.fits, plan.peak.reserved, plan.cost.tokens_per_s
"""

from megatron_adadpo.planner.inputs import (
    Cluster,
    LayoutError,
    PlanInput,
    check_layout,
    make_cluster,
    plan_input,
    read_recipe,
)
from megatron_adadpo.planner.memory import GIB, StageMemory, layer_activation_bytes, memory_plan
from megatron_adadpo.planner.params import layer_params, stage_params, total_params
from megatron_adadpo.planner.plan import Plan, load, make_plan
from megatron_adadpo.planner.search import suggest
from megatron_adadpo.planner.throughput import StepCost, forward_flops, step_cost

__all__ = [
    "GIB",
    "Cluster",
    "LayoutError",
    "Plan",
    "PlanInput",
    "StageMemory",
    "StepCost",
    "check_layout",
    "forward_flops",
    "layer_activation_bytes",
    "layer_params",
    "load",
    "make_cluster",
    "make_plan",
    "memory_plan",
    "plan_input",
    "read_recipe",
    "stage_params",
    "step_cost",
    "suggest",
    "total_params",
]
