"""Step FLOPs and time at a stated MFU.

Forward FLOPs of one sequence of ``s`` tokens (Megatron-LM's ``num_floating_point_operations``
convention: 2 FLOPs per multiply-add, the full ``s x s`` attention square):

    F = s * [2 * L * (h*(q + 2kv) + q*h + 3*h*f) + 2*h*V_pad] + 4 * s^2 * q * L

which for GPT shapes (f = 4h two-matrix MLP, MHA) is ``24*s*L*h^2*(1 + s/(6h) + V/(12*L*h))``:
Narayanan et al. 2021 without recompute (their ``96*...*V/(16*L*h)`` counts four passes).
One DPO step of ``G`` pairs runs ``2G`` sequences: policy forward + backward ``3F`` each,
resident reference forward ``F`` each (precomputed: 0 per step, ``F`` per pair once, ahead of
training). Full recompute adds one policy forward of hardware FLOPs, which MFU does not count.

Time per step = model FLOPs per GPU / (MFU * dense bf16 peak); MFU is quoted against the bf16
peak for FP8 runs too (as NVIDIA and Megatron report it). With a batching estimate on a length
profile (``planner/batching.py``) the GPUs compute the *processed* FLOPs (padding included) at
that utilisation, tokens/s counts real tokens, and the model TFLOP/s count the real tokens'
FLOPs only (the trainer's MFU does the same).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.planner.batching import BatchingEstimate
from megatron_adadpo.planner.inputs import PlanInput
from megatron_adadpo.platform.hardware import GpuSpec

# References that run a forward pass each step: a resident copy, or the policy with its LoRA
# adapters off (model/lora.py)
FORWARD_REFERENCES = ("resident", "adapters_off")
# Planning defaults for a DPO step (seq 2048, 1 pair per micro-batch, a reference forward):
# below NeMo's published pre-training numbers (H100 FP8, seq 8192: Llama-3-8B 711 and
# Llama-3-70B 734 model TFLOP/s per GPU = 72-74 % of the bf16 peak); see docs/scaling.md.
DEFAULT_MFU = {"bf16": 0.40, "fp8": 0.55, "fp32": 0.10}


@dataclass(frozen=True)
class StepCost:
    """FLOPs, time and throughput of one optimizer step on the whole cluster."""

    seq_length: float
    sequences: int
    tokens: float
    policy_flops: float  # forward + backward
    reference_flops: float  # forward of the resident reference (0 when precomputed)
    recompute_flops: float  # extra forward of full recompute (hardware FLOPs, not in MFU)
    precompute_flops_per_pair: float  # one-off reference pass when precomputed
    mfu: float
    peak_tflops: float
    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    pipeline_bubble: float  # idle fraction of a pipeline step, (PP-1)/(V*M)
    useful_flops: float  # model FLOPs of the real tokens (== model_flops without a profile)
    padding_fraction: float | None = None  # of processed tokens (None: no length profile)

    @property
    def model_flops(self) -> float:
        return self.policy_flops + self.reference_flops

    def to_dict(self) -> dict:
        return asdict(self) | {"model_flops": self.model_flops}


def forward_flops(p: PlanInput, seq_length: float) -> float:
    """Forward FLOPs of one sequence (``ModelConfig.forward_flops``, shared with the trainer)."""
    return p.model.forward_flops(seq_length, p.execution.tp)


def step_model_flops(
    model: ModelConfig, tp: int, seq_length: float, sequences: int, reference: str
) -> float:
    """Model FLOPs of one step over ``sequences`` sequences of ``seq_length`` tokens: policy
    forward + backward ``3F`` each, plus ``F`` each for a resident reference's forward (the
    trainer's MFU uses this too)."""
    passes = 4 if reference in FORWARD_REFERENCES else 3
    return passes * model.forward_flops(seq_length, tp) * sequences


def default_mfu(p: PlanInput) -> float:
    x = p.execution
    return DEFAULT_MFU["fp8" if x.fp8 else "bf16" if x.bf16 else "fp32"]


def step_cost(
    p: PlanInput,
    gpu: GpuSpec,
    world_size: int,
    num_micro: float,
    mfu: float | None = None,
    estimate: BatchingEstimate | None = None,
) -> StepCost:
    """FLOPs and time of one step of ``p.global_batch_size`` pairs on ``world_size`` GPUs;
    ``estimate``: the batching policy's cost on a length profile (else every sequence is
    ``avg_seq_length or seq_length`` tokens)."""
    mfu = default_mfu(p) if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    x = p.execution
    seqs = 2 * p.global_batch_size
    s = estimate.real_tokens / seqs if estimate else p.avg_seq_length or p.seq_length
    fwd = forward_flops(p, s)
    if estimate:
        passes = 4 if p.reference in FORWARD_REFERENCES else 3
        policy, reference = 3 * estimate.processed_flops, (passes - 3) * estimate.processed_flops
        useful, tokens = passes * estimate.useful_flops, estimate.real_tokens
    else:
        policy = step_model_flops(p.model, x.tp, s, seqs, "none")
        # F * 2G for a resident reference; else 0.0 (a float, as the JSON output always had it)
        reference = step_model_flops(p.model, x.tp, s, seqs, p.reference) - policy or 0.0
        useful, tokens = policy + reference, seqs * s
    recompute = fwd * seqs if x.recompute == "full" else 0.0
    peak = gpu.bf16_tflops if x.bf16 or x.fp8 else gpu.bf16_tflops / 2  # fp32: TF32 tensor cores
    time = (policy + reference) / world_size / (mfu * peak * 1e12)
    return StepCost(
        seq_length=s,
        sequences=seqs,
        tokens=tokens,
        policy_flops=policy,
        reference_flops=reference,
        recompute_flops=recompute,
        precompute_flops_per_pair=2 * fwd if p.reference == "precomputed" else 0.0,
        mfu=mfu,
        peak_tflops=peak,
        step_time_s=time,
        tokens_per_s=tokens / time,
        tokens_per_s_per_gpu=tokens / time / world_size,
        model_tflops_per_gpu=useful / time / world_size / 1e12,
        pipeline_bubble=(x.pp - 1) / ((x.vpp or 1) * num_micro),
        useful_flops=useful,
        padding_fraction=estimate.padding_fraction if estimate else None,
    )
