"""Per-token and per-sequence log-probs from vocab-parallel logits, without a vocab gather.

``log p(y_t) = -CE_t`` where ``CE`` is Megatron's ``vocab_parallel_cross_entropy``: each
tensor-parallel rank holds ``[s, b, v/tp]`` logits, and the log-sum-exp and the target logit are
reduced across the TP group (two scalar all-reduces per token), never materialising ``[s, b, v]``.
Sequence sums over completion tokens are then reduced across the context-parallel group when the
sequence is split over CP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from megatron_adadpo.platform.megatron import parallel_state, vocab_parallel_cross_entropy


def token_logprobs(
    vocab_parallel_logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
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

    ``tp_group``: the tensor-parallel group the vocabulary is split over (None: Megatron's
    ``parallel_state`` TP group).

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
    logits: torch.Tensor, target: torch.Tensor, tp_group=None, vocab_size: int | None = None
) -> torch.Tensor:
    """``log p(target)`` from fp32 vocab-parallel logits that the caller gives up.

    The logits are overwritten: TP padding columns (global index >= ``vocab_size``) are set to
    the lowest float, then Megatron's ``vocab_parallel_cross_entropy`` turns them into the
    softmax in place. The masking is not recorded by autograd: the masked columns get softmax
    exactly 0, hence gradient exactly 0, either way. ``logits`` may be a leaf that requires
    grad (its gradient is then the CE's).

    Shapes: logits ``[..., v/tp]`` fp32, target ``[...]`` global ids >= 0 -> ``[...]`` fp32.
    """
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if vocab_size is not None:
        with torch.no_grad():
            _mask_vocab_padding(logits, vocab_size, dist.get_rank(tp_group))
    return -vocab_parallel_cross_entropy(logits, target, tp_group)


def _mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> None:
    """In place: this shard's columns at global index >= ``vocab_size`` -> lowest float."""
    first_padded = _first_padded_column(logits.shape[-1], vocab_size, tp_rank)
    if first_padded < logits.shape[-1]:
        logits[..., first_padded:] = torch.finfo(logits.dtype).min


def _first_padded_column(shard: int, vocab_size: int, tp_rank: int) -> int:
    """Local index of this TP shard's first column at global index >= ``vocab_size``."""
    return min(max(vocab_size - tp_rank * shard, 0), shard)


def shard_logit_sums(logits: torch.Tensor, vocab_size: int | None, tp_rank: int) -> torch.Tensor:
    """Per-token sum of the logits over this TP shard's real (unpadded) vocabulary, fp32.

    All-reduced over TP and divided by ``vocab_size`` it is the mean logit over the vocabulary
    (TRL's ``logits/chosen`` before averaging over tokens); never a vocab gather.
    ``vocab_size`` None: every column is real.

    Shapes: logits ``[..., v/tp]`` -> ``[...]`` fp32.
    """
    real = logits.shape[-1]
    if vocab_size is not None:
        real = _first_padded_column(real, vocab_size, tp_rank)
    return logits[..., :real].sum(dim=-1, dtype=torch.float32)


def sequence_logprobs(
    token_logps: torch.Tensor, loss_mask: torch.Tensor, cp_group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked per-sequence sums of token log-probs and completion token counts.

    ``sum_b = sum_t mask[b, t] * logp[b, t]``; masked positions contribute exactly 0 even when
    their value is inf/NaN. With a context-parallel group of size > 1 (each rank holding a slice
    of the sequence), sums and counts are all-reduced over it; the sum's backward all-reduces
    the gradient too, so with Megatron's per-token loss normaliser (which counts every CP rank)
    the weight gradients come out exactly as at CP = 1.

    Shapes:
        token_logps: ``[b, s]`` fp32 per token; loss_mask: ``[b, s]`` (1 = completion token).
        returns: (``[b]`` fp32 per-sequence sums, ``[b]`` fp32 token counts).
    """
    mask = loss_mask > 0
    sums = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    counts = mask.sum(dim=-1).to(torch.float32)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        sums = differentiable_all_reduce(sums, group=cp_group)  # backward: all-reduced grads
        dist.all_reduce(counts, group=cp_group)
    return sums, counts
