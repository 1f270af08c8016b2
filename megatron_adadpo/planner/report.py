"""Human-readable planner output: layout, memory table per pipeline rank, step cost, verdict."""

from __future__ import annotations

from megatron_adadpo.planner.memory import GIB, PARTS, RUNTIME_GIB
from megatron_adadpo.planner.plan import Plan

_LABELS = {
    "weights": "weights",
    "gradients": "gradients (main grads)",
    "optimizer": "optimizer (master + Adam)",
    "activations": "activations (in flight)",
    "logits": "logits / log-prob buffers",
    "workspace": "layer workspace",
    "reference": "reference model",
}


def layout_line(plan: Plan) -> str:
    p, x = plan.input, plan.input.execution
    bits = [f"{p.layout_str()} x DP{plan.dp}"]
    bits.append("sequence parallel" if x.sequence_parallel else "no sequence parallel")
    bits.append(f"{x.recompute} recompute" if x.recompute else "no recompute")
    bits.append(f"fp8 ({x.fp8})" if x.fp8 else "bf16" if x.bf16 else "fp32")
    bits.append("distributed optimizer" if p.distributed_optimizer else "plain optimizer")
    bits.append(f"reference {p.reference}")
    return "; ".join(bits)


def _stages_to_show(plan: Plan) -> list:
    """First, peak and last pipeline ranks (deduplicated, in order)."""
    ranks = sorted({0, plan.peak.pp_rank, plan.input.execution.pp - 1})
    return [plan.stages[r] for r in ranks]


def memory_table(plan: Plan) -> str:
    stages = _stages_to_show(plan)
    head = f"  {'memory per GPU (GiB)':<30}" + "".join(
        f"{'PP rank ' + str(s.pp_rank):>12}" for s in stages
    )
    rows = [head]
    for part in PARTS:
        rows.append(
            f"  {_LABELS[part]:<30}" + "".join(f"{getattr(s, part) / GIB:>12.2f}" for s in stages)
        )
    rows.append(
        f"  {'= allocated (torch peak)':<30}"
        + "".join(f"{s.allocated / GIB:>12.2f}" for s in stages)
    )
    rows.append(
        f"  {'+ runtime and allocator slack':<30}"
        + "".join(f"{(s.reserved - s.allocated) / GIB:>12.2f}" for s in stages)
    )
    rows.append(f"  {'= reserved':<30}" + "".join(f"{s.reserved / GIB:>12.2f}" for s in stages))
    rows.append(
        f"  {'parameters on the rank':<30}" + "".join(f"{s.params / 1e9:>11.3f}B" for s in stages)
    )
    rows.append(
        f"  {'layer-micro-batches in flight':<30}"
        + "".join(f"{s.in_flight_layers:>12.1f}" for s in stages)
    )
    return "\n".join(rows)


def cost_lines(plan: Plan) -> list[str]:
    c, p = plan.cost, plan.input
    ref = (
        f"reference fwd {c.reference_flops / 1e15:.1f} PFLOP"
        if c.reference_flops
        else f"reference precomputed ({c.precompute_flops_per_pair / 1e12:.1f} TFLOP per pair, "
        "once)"
        if p.reference == "precomputed"
        else "no reference"
    )
    lines = [
        f"  step: {p.global_batch_size} pairs = {c.sequences} sequences x {c.seq_length:.0f} "
        f"tokens = {c.tokens / 1e6:.2f} M tokens; {_micro_batches(plan)} per DP rank; "
        f"pipeline bubble {c.pipeline_bubble:.1%}",
        f"  FLOPs: policy fwd+bwd {c.policy_flops / 1e15:.1f} PFLOP, {ref}"
        + (
            f", full-recompute extra {c.recompute_flops / 1e15:.1f} PFLOP (not in MFU)"
            if c.recompute_flops
            else ""
        ),
        f"  at MFU {c.mfu:.0%} of {c.peak_tflops:.0f} TFLOP/s ({c.model_tflops_per_gpu:.0f} "
        f"model TFLOP/s per GPU): {c.step_time_s:.2f} s/step, {c.tokens_per_s:,.0f} tokens/s "
        f"({c.tokens_per_s_per_gpu:,.0f} per GPU)",
    ]
    return lines


def _micro_batches(plan: Plan) -> str:
    p, e = plan.input, plan.batching
    if e is None:
        return f"{plan.num_micro:g} micro-batches of {p.micro_batch_size} pair(s)"
    return (
        f"{e.micro_batches:.1f} {p.batching} micro-batches of {e.tokens_per_micro_batch:,.0f} "
        f"tokens (at most {e.max_tokens_per_micro_batch:,}; padding {e.padding_fraction:.1%}, "
        f"FLOPs {e.flops_overhead:.2f}x the real tokens')"
    )


def render(plan: Plan, title: str = "") -> str:
    p, cl = plan.input, plan.cluster
    m = p.model
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"GPUs: {cl.world_size} x {cl.gpu.name} ({cl.nodes} node(s) x "
        f"{cl.gpus_per_node}), {cl.gpu.memory_gib:.1f} GiB each"
    )
    lines.append(
        f"model: {plan.total_params / 1e9:.2f} B parameters ({m.num_layers} layers, "
        f"hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, {m.num_attention_heads} "
        f"heads / {m.query_groups} groups, vocab {m.vocab_size} -> "
        f"{m.padded_vocab_size(p.execution.tp)})"
    )
    lines.append(f"layout: {layout_line(plan)}")
    lines.append(memory_table(plan))
    lines += cost_lines(plan)
    for w in plan.warnings:
        lines.append(f"  warning: {w}")
    peak = plan.peak
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"verdict: {verdict}: peak {peak.reserved / GIB:.1f} GiB reserved "
        f"({peak.allocated / GIB:.1f} GiB allocated + {RUNTIME_GIB:.0f} GiB runtime) on "
        f"PP rank {peak.pp_rank} of {cl.gpu.memory_gib:.1f} GiB"
    )
    return "\n".join(lines)


def suggestion_line(plan: Plan) -> str:
    p, x = plan.input, plan.input.execution
    sets = [
        f"execution.tp={x.tp}",
        f"execution.pp={x.pp}",
        f"execution.vpp={x.vpp if x.vpp else 'null'}",
        f"execution.sequence_parallel={str(x.sequence_parallel).lower()}",
        f"execution.recompute={x.recompute or 'null'}",
        f"train.micro_batch_size={p.micro_batch_size}",
        "optimizer.use_distributed_optimizer=true",
    ]
    return (
        f"  {layout_line(plan)}: {plan.peak.reserved / GIB:.1f} GiB, "
        f"{plan.cost.step_time_s:.2f} s/step, bubble {plan.cost.pipeline_bubble:.1%}\n"
        f"    --set " + " --set ".join(sets)
    )
