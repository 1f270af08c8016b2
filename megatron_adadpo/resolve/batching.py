"""The batching a run uses: its micro-batching policy and how packed rows reach attention.

``batching_policy`` is the one place ``data.batching`` / ``data.max_tokens_per_micro_batch`` /
``train.micro_batch_size`` meet the layout (``data/batching.py`` runs the policy);
``packing_format`` says how a packed row reaches attention; ``budget_errors`` is the token
budget's rule. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_adadpo.data.batching import BatchingPolicy

if TYPE_CHECKING:
    from megatron_adadpo.layout import ExecutionConfig


@dataclass(frozen=True)
class Batching:
    """How each global batch becomes micro-batches, and how packed rows are attended.

    Attributes:
        policy: the micro-batching policy (``data/batching.py``).
        packing: None (rows not packed) | "thd" (Transformer Engine's ``PackedSeqParams``) |
            "mask" (a block-diagonal attention mask).
    """

    policy: BatchingPolicy
    packing: str | None = None


def batching_policy(
    mode: str, max_tokens: int | None, execution: ExecutionConfig, micro_batch_size: int
) -> BatchingPolicy:
    """The policy of ``data.batching`` / ``data.max_tokens_per_micro_batch`` under a layout
    and ``train.micro_batch_size``: sequences padded to ``pad_multiple``, packed sequences
    each to ``2*CP`` (THD with context parallelism), micro-batch counts a multiple of ``PP``
    with the interleaved schedule, and packed rows of a pipeline's step one length (fixed
    p2p shapes: ``BatchingPolicy.step_row_tokens``)."""
    packed = mode == "packed"
    return BatchingPolicy(
        mode=mode,
        micro_batch_size=micro_batch_size,
        max_tokens=max_tokens,
        pad_multiple=execution.pad_multiple,
        segment_multiple=2 * execution.cp if packed and execution.cp > 1 else 1,
        microbatch_multiple=execution.pp if execution.vpp else 1,
        fixed_rows=packed and execution.pp > 1,
    )


def packing_format(mode: str, attention: str) -> str | None:
    """Packed rows reach attention as THD ``PackedSeqParams`` exactly when the resolved core
    attention is Transformer Engine's. Any other core attention gets the block-diagonal mask:
    Megatron's own ``DotProductAttention`` (``execution.attention: megatron_local``) asserts
    ``packed_seq_params is None`` (megatron-core 0.16.1 ``transformer/dot_product_attention.py``
    line 153), and the SDPA attention takes a mask, also beside the TE layer spec."""
    if mode != "packed":
        return None
    return "thd" if attention == "transformer_engine" else "mask"


def budget_errors(policy: BatchingPolicy, max_length: int) -> list[str]:
    """A token budget below the longest pair ``data.max_length`` allows, padded for the layout
    (``DataConfig`` itself checks that a budget is given)."""
    if policy.mode == "fixed":
        return []
    longest = policy.longest_pair_tokens(max_length)
    if policy.max_tokens >= longest:
        return []
    return [
        f"data.max_tokens_per_micro_batch={policy.max_tokens} is smaller than the longest pair "
        f"data.max_length={max_length} allows ({longest} tokens: chosen and rejected rows, "
        f"padded); a pair is never split, so raise it to >= {longest}"
    ]
