"""Context parallelism: the part of each micro-batch a context-parallel rank computes.

Megatron-Core leaves the split to its caller: each CP rank must be handed its share of the
sequence, and only RoPE slices itself (``rope_utils.get_pos_emb_on_this_cp_rank``); Transformer
Engine's ring attention exchanges K/V assuming the same layout. The sequence is cut into
``2*CP`` equal chunks and rank ``r`` keeps chunks ``r`` and ``2*CP-1-r`` (an early chunk with a
late one, so causal attention's work is balanced), exactly as ``megatron/core/utils.py``
``get_batch_on_this_cp_rank`` does (0.16: one function; 0.19: its per-sequence branch) — tested
equal to it. Written here as a function of ``(rank, size)`` because Megatron's splits *every*
tensor of the dict along dim 1 (per-pair values would break) and changed signature between
0.16 and 0.19.

Per-token tensors (every ``[2B, S, ...]`` entry: tokens, labels, loss_mask, position_ids) are
split; per-pair values (``pair_ids`` ``[B]``, ``reference_logps`` ``[2B]``) are kept whole: the
loss path all-reduces sequence sums over the CP group (``logprobs.sequence_logprobs``), so
every CP rank holds the same per-pair scores, losses and metrics.
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


def split_for_context_parallel(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This CP rank's micro-batch: every per-token ``[b, S, ...]`` tensor cut to its
    ``[b, S/CP, ...]`` zigzag share (of the whole row; of each sequence for a packed row, which
    carries ``cu_seqlens_padded``); everything else unchanged (a packed row's ``cu_seqlens*``
    and ``max_seqlen`` stay global, as THD attention wants them). ``cp_size == 1``: the batch
    itself.

    Shapes: tokens, labels, loss_mask, position_ids (segment_ids) ``[b, S]`` -> ``[b, S/CP]``;
    pair_ids ``[B]`` and reference_logps ``[2B]`` (per pair / per sequence) unchanged.
    """
    if cp_size == 1:
        return batch
    rows, seq = batch["tokens"].shape[:2]
    if "cu_seqlens_padded" in batch:
        keep = thd_partition_index(batch["cu_seqlens_padded"], cp_size, cp_rank)
    else:
        keep = zigzag_positions(seq, cp_rank, cp_size)
    keep = keep.to(batch["tokens"].device)
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, seq):
            out[key] = value.index_select(1, keep)
    return out


def full_sequence_length(local_tokens: torch.Tensor, cp_size: int) -> int:
    """The micro-batch's whole sequence length ``S`` from a CP rank's ``[2B, S/CP]`` tokens."""
    return local_tokens.shape[1] * cp_size
