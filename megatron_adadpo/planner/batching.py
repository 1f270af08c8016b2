"""What a batching mode costs on a length profile: tokens, padding and FLOPs of a step.

The trainer's own policy (``data/batching.plan_global_batch``) runs on global batches drawn
from a length profile (``data/length_profile.py``: UltraFeedback-like, or a data manifest's
histogram), so the planner sees the micro-batches training will see. FLOPs use the model's
``forward_flops`` (Megatron-LM's count), written as ``F(s) = a*s + b*s^2`` per sequence:

- unpacked rows ``[2B, S]``: ``2B * F(S)`` (padding computed like real tokens);
- a packed row of ``T`` tokens holding sequences ``s_i``: ``a*T + b*sum(s_i^2)`` with
  Transformer Engine's THD attention (one attention per sequence), ``a*T + b*T^2`` on the local
  spec (one dense masked attention over the row);
- useful: ``sum_i F(len_i)`` over the real sequences only, the FLOPs bound of any batching.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from megatron_adadpo.data.batching import BatchingPolicy, plan_global_batch, round_up
from megatron_adadpo.model.config import ModelConfig


def flops_coefficients(model: ModelConfig, tp: int) -> tuple[float, float]:
    """``(a, b)`` with ``model.forward_flops(s) = a*s + b*s^2`` (one sequence, forward)."""
    f1, f2 = model.forward_flops(1, tp), model.forward_flops(2, tp)
    b = (f2 - 2 * f1) / 2
    return f1 - b, b


@dataclass(frozen=True)
class BatchingEstimate:
    """Mean cost of one global batch under a batching policy (forward FLOPs, all DP ranks)."""

    mode: str
    micro_batches: float  # per DP rank and step
    tokens_per_micro_batch: float  # processed, padding included
    max_tokens_per_micro_batch: int
    processed_tokens: float  # per step
    real_tokens: float
    padding_fraction: float
    processed_flops: float  # forward, per step
    useful_flops: float  # forward of the real tokens, per step

    @property
    def flops_overhead(self) -> float:
        """Processed / useful FLOPs (1.0 = no FLOPs on padding)."""
        return self.processed_flops / self.useful_flops

    def to_dict(self) -> dict:
        return asdict(self) | {"flops_overhead": self.flops_overhead}


def micro_batch_flops(
    policy: BatchingPolicy,
    lengths: np.ndarray,
    micro: tuple[int, ...],
    ab,
    flash: bool,
    row_tokens: int | None = None,
) -> float:
    """Forward FLOPs of one micro-batch as laid out by ``policy`` (see the module docstring);
    ``row_tokens``: a packed row's length when the step fixes it (pipelines)."""
    a, b = ab
    if policy.mode == "packed":
        total = row_tokens or policy.padded_tokens(lengths, micro)
        sequences = round_up(lengths[list(micro)], policy.segment_multiple).astype(np.float64)
        return a * total + b * (float((sequences**2).sum()) if flash else float(total) ** 2)
    seq = policy.padded_tokens(lengths, micro) / (2 * len(micro))
    return 2 * len(micro) * (a * seq + b * seq**2)


def estimate_batching(
    policy: BatchingPolicy,
    rows: np.ndarray,
    global_batch_size: int,
    dp: int,
    model: ModelConfig,
    tp: int = 1,
    flash: bool = True,
) -> BatchingEstimate:
    """Mean cost per step of ``policy`` over the global batches in ``rows`` (int ``[n*G, 2]``,
    chosen and rejected row lengths; ``n`` whole global batches)."""
    ab = flops_coefficients(model, tp)
    steps = len(rows) // global_batch_size
    if steps < 1:
        raise ValueError(f"{len(rows)} pairs do not fill one global batch of {global_batch_size}")
    sizes, flops = [], 0.0
    for step in range(steps):
        lengths = rows[step * global_batch_size : (step + 1) * global_batch_size]
        for rank in plan_global_batch(policy, lengths, dp):
            row = policy.step_row_tokens(lengths, rank)
            for micro in rank:
                sizes.append(row or policy.padded_tokens(lengths, micro))
                flops += micro_batch_flops(policy, lengths, micro, ab, flash, row)
    used = rows[: steps * global_batch_size].astype(np.float64)
    processed, real = sum(sizes) / steps, float(used.sum()) / steps
    return BatchingEstimate(
        mode=policy.mode,
        micro_batches=len(sizes) / steps / dp,
        tokens_per_micro_batch=sum(sizes) / len(sizes),
        max_tokens_per_micro_batch=max(sizes),
        processed_tokens=processed,
        real_tokens=real,
        padding_fraction=1.0 - real / processed,
        processed_flops=flops / steps,
        useful_flops=(ab[0] * float(used.sum()) + ab[1] * float((used**2).sum())) / steps,
    )
