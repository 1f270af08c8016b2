"""Per-token statistics of the softmax over vocab-parallel logits, without a vocab gather.

For each token with logits ``z`` over the true vocabulary ``V`` (Megatron's TP padding columns
excluded), split over the tensor-parallel ranks as ``[..., v/tp]`` shards, and label ``y``:

    M      = max_v z_v                         global max (from the shards' maxima)
    S      = sum_v exp(z_v - M)                summed over TP
    entropy          = log S - (1 / S) sum_v exp(z_v - M) (z_v - M)
                     = logsumexp(z) - sum_v p_v z_v                      (TRL's ``entropy``)
    log_sum_sq_probs = log sum_v p_v^2 = log sum_v exp(2 (z_v - M)) - 2 log S
                     = logsumexp(2 z) - 2 logsumexp(z)                   (WPO's weights)
    top1             = [argmax_v z_v == y], ties to the lowest global index  (TRL's
                       ``is_top1``: ``mean_token_accuracy``)

Two collectives over the TP group per call, whatever the number of tokens: one all-gather of
each rank's ``[2, n]`` (local max, local arg-max's global index) fixes ``M`` and the arg-max (the
first rank holding ``M``, then its first column: the lowest global index), and one all-reduce
SUM of the ``[k, n]`` sums. Logits are read a block of tokens at a time in fp32 (at most
``logprobs._UPCAST_ELEMENTS`` at once) and never modified. No gradient: these are metrics, and
WPO's weights are detached by definition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_adadpo import logprobs
from megatron_adadpo.platform.megatron import parallel_state

TOKEN_STATS = ("entropy", "top1", "log_sum_sq_probs")


@torch.no_grad()
def vocab_parallel_token_stats(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    names: tuple[str, ...],
    vocab_size: int | None = None,
    tp_group=None,
) -> dict[str, torch.Tensor]:
    """The statistics ``names`` (a subset of :data:`TOKEN_STATS`) of each token's softmax.

    ``target``: global label ids (>= 0; used by ``top1`` only). ``vocab_size``: the true
    vocabulary (columns at global index >= it are left out, as in ``logprobs.token_logprobs``).
    Every TP rank returns the same values.

    Shapes:
        vocab_parallel_logits: ``[..., v/tp]`` (any float dtype, any leading dims), per token.
        target: the leading dims, e.g. ``[s, b]``.
        returns: ``{name: fp32 tensor of the leading dims}`` (``top1``: 1.0 / 0.0).
    """
    unknown = sorted(set(names) - set(TOKEN_STATS))
    if unknown:
        raise ValueError(f"unknown token statistics {unknown}; known: {list(TOKEN_STATS)}")
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    shard = vocab_parallel_logits.shape[-1]
    tp_rank = dist.get_rank(tp_group)
    columns = logprobs.true_vocab_columns(shard, vocab_size, tp_rank)
    tokens = vocab_parallel_logits.detach()[..., :columns].flatten(0, -2)  # [n, columns]
    blocks = tokens.split(max(1, logprobs._UPCAST_ELEMENTS // max(columns, 1)))
    top, argmax = _global_max(blocks, tp_rank * shard, tp_group)
    sums = _shifted_sums(blocks, top, "log_sum_sq_probs" in names)
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sums, group=tp_group)
    log_s = sums[0].log()
    out = {}
    if "entropy" in names:
        out["entropy"] = log_s - sums[1] / sums[0]
    if "log_sum_sq_probs" in names:
        out["log_sum_sq_probs"] = sums[2].log() - 2 * log_s
    if "top1" in names:
        out["top1"] = (argmax == target.flatten().to(argmax)).float()
    shape = vocab_parallel_logits.shape[:-1]
    return {name: value.view(shape) for name, value in out.items()}


def _global_max(blocks, first_column: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, argmax)``, each ``[n]``: the max over the TP group of every token's logits and its
    lowest global column index (float64: exact for any vocabulary below 2^53)."""
    local = []
    for block in blocks:
        if block.shape[-1] == 0:  # a rank holding only TP padding columns
            empty = torch.full(block.shape[:1], -torch.inf, device=block.device)
            local.append(torch.stack([empty, torch.zeros_like(empty)]).double())
            continue
        value, index = block.float().max(dim=-1)  # the first maximal column
        local.append(torch.stack([value.double(), (index + first_column).double()]))
    local = torch.cat(local, dim=1)  # [2, n]
    world = dist.get_world_size(tp_group)
    if world == 1:
        return local[0].float(), local[1].long()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=tp_group)
    gathered = torch.stack(parts)  # [tp, 2, n], ranks in order of their columns
    top = gathered[:, 0].amax(dim=0)
    first = (gathered[:, 0] == top).to(torch.uint8).argmax(dim=0)  # lowest rank holding M
    argmax = gathered[:, 1].gather(0, first.unsqueeze(0)).squeeze(0)
    return top.float(), argmax.long()


def _shifted_sums(blocks, top: torch.Tensor, with_squares: bool) -> torch.Tensor:
    """This rank's ``[k, n]`` fp32 sums over its columns: ``sum exp(z - M)``,
    ``sum exp(z - M) (z - M)`` and, ``with_squares``, ``sum exp(2 (z - M))``."""
    rows = []
    start = 0
    for block in blocks:
        m = top[start : start + block.shape[0]].unsqueeze(1)
        start += block.shape[0]
        shifted = block.float() - m  # <= 0
        e = shifted.exp()
        total = e.sum(dim=-1)
        squares = torch.linalg.vecdot(e, e) if with_squares else None
        weighted = e.mul_(shifted).sum(dim=-1)  # in place: one [rows, columns] buffer less
        parts = [total, weighted] if squares is None else [total, weighted, squares]
        rows.append(torch.stack(parts))
    return torch.cat(rows, dim=1)
