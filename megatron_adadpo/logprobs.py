"""Per-token and per-sequence log-probs from vocab-parallel logits, without a vocab gather.

``log p(y_t) = -CE_t`` where ``CE`` is Megatron's ``vocab_parallel_cross_entropy``: each
tensor-parallel rank holds ``[s, b, v/tp]`` logits, and the log-sum-exp and the target logit are
reduced across the TP group (two scalar all-reduces per token), never materialising ``[s, b, v]``.
Sequence sums over completion tokens are then reduced across the context-parallel group when the
sequence is split over CP ranks. The mean logit over the vocabulary (TRL's ``logits/chosen`` /
``logits/rejected`` metrics) is computed the same way: each TP rank sums its shard of the true
vocabulary, sums are taken over completion tokens, and one ``[b]`` all-reduce over TP adds the
shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from megatron_adadpo.platform.megatron import vocab_parallel_cross_entropy


def token_logprobs(
    vocab_parallel_logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of each label under the vocab-parallel logits, in fp32.

    Labels may hold ignore markers (< 0); they are replaced by 0 for the lookup and the returned
    values at those positions are meaningless: mask them with ``sequence_logprobs``. The caller's
    logits are never modified (Megatron's CE works in place, so fp32 input is copied).

    ``vocab_size`` (the tokenizer's vocabulary) excludes the rows Megatron adds to make the
    vocabulary divisible by ``make_vocab_size_divisible_by * TP``: their logits leave the
    softmax, so log-probs do not depend on the TP size and equal the HF model's after
    conversion (padded rows are zero, i.e. logit 0, which would otherwise take probability).

    ``tp_group``: the tensor-parallel group the vocabulary is split over (the run's
    ``Parallel.tp``).

    Shapes:
        vocab_parallel_logits: ``[s, b, v/tp]`` (any float dtype), per token.
        labels: ``[b, s]`` token ids (global vocab indices).
        returns: ``[b, s]`` fp32 per-token log-probs.
    """
    if vocab_parallel_logits.dim() != 3 or labels.shape != vocab_parallel_logits.shape[1::-1]:
        raise ValueError(
            f"logits must be [s, b, v/tp] and labels [b, s]; got logits "
            f"{tuple(vocab_parallel_logits.shape)} and labels {tuple(labels.shape)}"
        )
    logits = vocab_parallel_logits.float().contiguous()
    if logits.data_ptr() == vocab_parallel_logits.data_ptr():
        logits = logits.clone()  # vocab_parallel_cross_entropy mutates its input in place
    target = labels.clamp(min=0).transpose(0, 1).contiguous()
    return consume_logits(logits, target, tp_group, vocab_size).transpose(0, 1)


def consume_logits(
    logits: torch.Tensor, target: torch.Tensor, tp_group, vocab_size: int | None = None
) -> torch.Tensor:
    """``log p(target)`` from fp32 vocab-parallel logits that the caller gives up.

    The logits are overwritten: TP padding columns (global index >= ``vocab_size``) are set to
    the lowest float, then Megatron's ``vocab_parallel_cross_entropy`` turns them into the
    softmax in place. The masking is not recorded by autograd: the masked columns get softmax
    exactly 0, hence gradient exactly 0, either way. ``logits`` may be a leaf that requires
    grad (its gradient is then the CE's).

    Shapes: logits ``[..., v/tp]`` fp32, target ``[...]`` global ids >= 0 -> ``[...]`` fp32.
    """
    if vocab_size is not None:
        with torch.no_grad():
            _mask_vocab_padding(logits, vocab_size, dist.get_rank(tp_group))
    return -vocab_parallel_cross_entropy(logits, target, tp_group)


def true_vocab_columns(shard: int, vocab_size: int | None, tp_rank: int) -> int:
    """How many of this rank's ``shard`` columns lie inside the true vocabulary (the first ones;
    Megatron's TP padding columns, global index >= ``vocab_size``, come last)."""
    if vocab_size is None:
        return shard
    return min(max(vocab_size - tp_rank * shard, 0), shard)


def _mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> None:
    """In place: this shard's columns at global index >= ``vocab_size`` -> lowest float."""
    true_columns = true_vocab_columns(logits.shape[-1], vocab_size, tp_rank)
    if true_columns < logits.shape[-1]:
        logits[..., true_columns:] = torch.finfo(logits.dtype).min


# fp32 elements upcast at a time by shard_logit_sums (128 MiB): a bf16 shard is never copied
# whole to fp32.
_UPCAST_ELEMENTS = 2**25


def shard_logit_sums(
    vocab_parallel_logits: torch.Tensor, vocab_size: int | None, tp_group
) -> torch.Tensor:
    """Per-token sum of this TP rank's logits over its columns of the true vocabulary.

    ``sum_{v in shard, v < vocab_size} logit[..., v]``, accumulated in fp32 a block of tokens at
    a time (at most 128 MiB of fp32 at once), detached (a metric). No communication, so it works
    on any slice of tokens: the whole micro-batch, or one chunk ``[c, b, v/tp]`` of a chunked
    output layer (concatenate the chunks' results along the token dimension).
    :func:`sequence_mean_logits` adds the shards.

    Shapes:
        vocab_parallel_logits: ``[s, b, v/tp]`` or ``[b, s, v/tp]`` (any leading dims).
        returns: the leading dims, e.g. ``[s, b]``, fp32, per token.
    """
    shard = vocab_parallel_logits.shape[-1]
    true_columns = true_vocab_columns(shard, vocab_size, dist.get_rank(tp_group))
    tokens = vocab_parallel_logits.detach()[..., :true_columns].flatten(0, -2)  # [n, columns]
    rows = max(1, _UPCAST_ELEMENTS // max(true_columns, 1))
    sums = [block.sum(dim=-1, dtype=torch.float32) for block in tokens.split(rows)]
    return torch.cat(sums).view(vocab_parallel_logits.shape[:-1])


@torch.no_grad()
def sequence_mean_logits(
    shard_sums: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_size: int,
    tp_group,
    cp_group=None,
    **segments,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums over completion tokens of the mean logit over the vocabulary.

    ``sum_b = sum_t mask[b, t] * (1 / V) sum_v logit[b, t, v]`` with ``V = vocab_size`` (the
    true vocabulary): the masked token sums of :func:`shard_logit_sums` are all-reduced over
    TP (one ``[b]`` collective; never a vocab gather), and with the counts over CP.
    ``sums.sum() / counts.sum()`` is TRL's ``logits/chosen`` (or ``/rejected``). ``segments``:
    :func:`sequence_logprobs`' ``segment_ids`` / ``num_sequences`` for packed rows.

    Shapes:
        shard_sums: ``[b, s]`` fp32 per token; loss_mask: ``[b, s]`` (1 = completion token).
        returns: (``[b]`` fp32 per-sequence sums of mean logits, ``[b]`` fp32 token counts).
    """
    sums, counts = sequence_logprobs(shard_sums, loss_mask, cp_group, **segments)  # masked, CP
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sums, group=tp_group)
    return sums / vocab_size, counts


def sequence_logprobs(
    token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    cp_group=None,
    segment_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked per-sequence sums of token log-probs and completion token counts.

    ``sum_b = sum_t mask[b, t] * logp[b, t]``; masked positions contribute exactly 0 even when
    their value is inf/NaN. With a context-parallel group of size > 1 (each rank holding a slice
    of the sequence), sums and counts are all-reduced over it; the sum's backward all-reduces
    the gradient too, so with Megatron's per-token loss normaliser (which counts every CP rank)
    the weight gradients come out exactly as at CP = 1.

    Packed rows (``data/packing.py``): a sequence is a segment of a row; ``segment_ids`` gives
    each token's sequence index (``-1`` = padding, which the mask excludes) and the sums are
    taken per segment: ``sum_k = sum_{b,t: seg[b, t] = k} mask[b, t] * logp[b, t]`` for
    ``k < num_sequences``.

    Shapes:
        token_logps: ``[b, s]`` fp32 per token; loss_mask: ``[b, s]`` (1 = completion token);
        segment_ids: int ``[b, s]`` or None.
        returns: (``[n]`` fp32 per-sequence sums, ``[n]`` fp32 token counts); ``n = b``, or
        ``num_sequences`` with segments.
    """
    mask = loss_mask > 0
    masked = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    if segment_ids is None:
        sums, counts = masked.sum(dim=-1), mask.sum(dim=-1).to(torch.float32)
    else:
        index = segment_ids.clamp(min=0).flatten()  # padding adds its masked 0 to sequence 0
        sums = masked.new_zeros(num_sequences).index_add(0, index, masked.flatten())
        ones = mask.flatten().to(torch.float32)
        counts = ones.new_zeros(num_sequences).index_add(0, index, ones)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        sums = differentiable_all_reduce(sums, group=cp_group)  # backward: all-reduced grads
        dist.all_reduce(counts, group=cp_group)
    return sums, counts


@torch.no_grad()
def ld_token_weights(
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor,
    counts: torch.Tensor,
    alpha: float,
    cp_group=None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """LD-DPO's per-token weights (arXiv 2409.06411; TRL's ``ld_alpha``), 0 outside the mask.

    For the pair ``(w, l)`` with completion lengths ``n_w, n_l`` and ``m = min(n_w, n_l)``, the
    token at completion position ``p`` (1-based) of either response weighs
    ``1 if p <= m else alpha``, so ``sum_t weight_t log p_t = shared + alpha * tail`` (TRL's
    ``shared_logps + ld_alpha * tail_logps``). ``p = position_ids - first + 1``, ``first``
    being the sequence's smallest completion position over every CP rank (one MIN all-reduce):
    ``position_ids`` must be each token's index in its whole row (collate and packing lay it
    out so; the CP split keeps it), and a sequence's completion tokens are contiguous.

    Shapes:
        loss_mask, position_ids: ``[b, s]`` per token (this CP rank's share).
        counts: ``[n]`` per sequence, completion lengths over all CP ranks (``sequence_logprobs``),
        ``[c0, r0, c1, r1, ...]``; segment_ids: a packed row's, as ``sequence_logprobs``.
        returns: ``[b, s]`` fp32 per-token weights.
    """
    mask = loss_mask > 0
    if segment_ids is None:
        rows = torch.arange(mask.shape[0], device=mask.device)
        sequence = rows.unsqueeze(1).expand_as(mask)
    else:
        sequence = segment_ids.clamp(min=0)
    positions = position_ids.to(torch.int64)
    completion = torch.where(mask, positions.double(), torch.inf)  # no boolean index: no sync
    first = torch.full_like(counts, torch.inf, dtype=torch.float64)
    first = first.scatter_reduce(0, sequence.flatten(), completion.flatten(), "amin")
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=cp_group)
    shared = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2).double()
    within = (positions - first[sequence]) < shared[sequence]
    weights = torch.where(within, 1.0, float(alpha)).float()
    return torch.where(mask, weights, torch.zeros_like(weights))
