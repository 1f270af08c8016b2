"""Context parallelism: the part of each micro-batch a context-parallel rank computes.

Megatron-Core leaves the split to its caller: each CP rank must be handed its share of the
sequence, and only RoPE slices itself (``rope_utils.get_pos_emb_on_this_cp_rank``); Transformer
Engine's ring attention exchanges K/V assuming the same layout. The sequence is cut into
``2*CP`` equal chunks and rank ``r`` keeps chunks ``r`` and ``2*CP-1-r`` (an early chunk with a
late one, so causal attention's work is balanced), exactly as ``megatron/core/utils.py``
``get_batch_on_this_cp_rank`` does (0.16: one function; 0.19: its per-sequence branch) — tested
equal to it. Written here as functions of ``(rank, size)`` because Megatron's splits *every*
tensor of the dict along dim 1 (per-pair values would break) and changed signature between
0.16 and 0.19. ``MicroBatch.on_cp_rank`` (``run/microbatch.py``) applies them: per-token
tensors (tokens, labels, loss_mask, position_ids, a packed row's segment_ids) are cut, per-pair
values (``pair_ids`` ``[B]``, ``reference_logps`` ``[2B]``) are kept whole: the loss path
all-reduces sequence sums over the CP group (``logprobs.sequence_logprobs``), so every CP rank
holds the same per-pair scores, losses and metrics.
"""

from __future__ import annotations

import torch


def zigzag_positions(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Sequence positions rank ``cp_rank`` holds: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank``
    of ``2*cp_size`` equal chunks, in that order. Shape ``[seq_length / cp_size]``."""
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2*CP = {2 * cp_size}: pad to "
            "megatron_adadpo.layout.pad_multiple (the batches of the trainer are)"
        )
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} outside the context-parallel group of {cp_size}")
    chunk = seq_length // (2 * cp_size)
    chunks = torch.arange(seq_length).view(2 * cp_size, chunk)
    return chunks[[cp_rank, 2 * cp_size - 1 - cp_rank]].reshape(-1)


def thd_partition_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int):
    """Positions of a packed row (THD layout, ``data/packing.py``) that CP rank ``cp_rank``
    holds: the zigzag share of every padded sequence, as Transformer Engine's
    ``thd_get_partitioned_indices`` (Megatron-Core 0.16.1 ``utils.get_thd_batch_on_this_cp_rank``).

    Shapes: cu_seqlens_padded int ``[n + 1]`` -> int64 ``[T / cp_size]``.
    """
    bounds = cu_seqlens_padded.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if (end - start) % (2 * cp_size):
            raise ValueError(
                f"a packed sequence of padded length {end - start} is not a multiple of "
                f"2 x CP = {2 * cp_size} (collate_packed(segment_multiple=2 * CP))"
            )
        parts.append(start + zigzag_positions(end - start, cp_rank, cp_size))
    return torch.cat(parts)
