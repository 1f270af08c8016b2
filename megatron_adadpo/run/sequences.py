"""Per-token values of one micro-batch -> the per-sequence values the loss and metrics use.

``policy_forward``'s output (vocab-parallel logits, or the output layer's input for the chunked
path) becomes per-token log-probs and, on request, per-token statistics of the same logits
(``token_stats``: entropy, arg-max hit, ``log sum_v p_v^2``; the TP shard's logit sums); then
sums over each sequence's completion tokens, reduced over the context-parallel group
(``logprobs.sequence_logprobs``; per segment of a packed row). Rows / sequences are
``[c0, r0, c1, r1, ...]``.

- LD-DPO (``loss.ld_alpha``): the log-prob sum is ``sum_t w_t log p_t`` with LD-DPO's per-token
  weights (``logprobs.ld_token_weights``), for the policy and the reference alike (the
  reference's forward and precompute call :func:`sequence_sums` too).
- WPO (``loss.use_weighting``): per sequence, the mean over completion tokens of
  ``log p_t - log sum_v p_v^2`` (TRL's ``aligned_logps``), detached.
- TRL's metrics: ``entropy`` (mean over the chosen and rejected completion tokens of the valid
  pairs), ``mean_token_accuracy`` (share of the chosen completion tokens whose label is the
  arg-max), ``logits/chosen`` / ``logits/rejected``; ``[sum, count]`` tensors, token-weighted
  over the global batch as TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_adadpo.chunked_logprobs import LOGIT_SUM, OutputLayer, chunked_token_logprobs
from megatron_adadpo.logprobs import (
    ld_token_weights,
    sequence_logprobs,
    sequence_mean_logits,
    shard_logit_sums,
    token_logprobs,
)
from megatron_adadpo.losses import token_mean_metric
from megatron_adadpo.run.microbatch import MicroBatch
from megatron_adadpo.token_stats import vocab_parallel_token_stats


@dataclass(frozen=True)
class SequenceValues:
    """One micro-batch's per-sequence values (``[n]``, ``n = 2B`` sequences) and per-token
    statistics (``[b, S]``, this CP rank's tokens)."""

    sums: torch.Tensor  # completion log-prob sums (LD-DPO weighted with loss.ld_alpha)
    counts: torch.Tensor  # completion token counts (fp32)
    plain_sums: torch.Tensor  # unweighted sums (the same tensor without ld_alpha)
    token_logps: torch.Tensor  # [b, S] per-token log-probs
    token_stats: dict  # name -> [b, S] fp32 (no gradient)


def segments(batch: MicroBatch) -> dict:
    """``sequence_logprobs``' per-segment arguments for a packed row (``{}`` otherwise)."""
    if batch.segment_ids is None:
        return {}
    return {"segment_ids": batch.segment_ids, "num_sequences": batch.num_sequences}


def step_stats(context) -> tuple[str, ...]:
    """The per-token statistics ``loss_func`` needs: the logit sums (``logits/*``), entropy and
    arg-max hit with ``logging.token_metrics``, ``log sum_v p_v^2`` with WPO."""
    stats = [LOGIT_SUM]
    if context.token_metrics:
        stats += ["entropy", "top1"]
    if context.loss.use_weighting:
        stats.append("log_sum_sq_probs")
    return tuple(stats)


def token_values(output, batch: MicroBatch, context, output_layer: OutputLayer | None, stats=()):
    """``(log-probs [b, S], {stat: [b, S]})`` of ``policy_forward``'s output.

    Unchunked: ``output`` is ``[b, S, v/tp]`` logits; Megatron's vocab-parallel CE gives the
    log-probs and the statistics are read from the same logits (every token, no host sync).
    Chunked (``output_layer``): ``output`` is the output layer's input and both come from
    ``chunked_token_logprobs`` (completion tokens only; 0 elsewhere).
    """
    labels, tp = batch.labels, context.parallel.tp
    if output_layer is not None:
        result = chunked_token_logprobs(
            output,
            output_layer,
            labels,
            batch.loss_mask,
            chunk_tokens=context.logprob_chunk_tokens,
            tp_group=tp,
            vocab_size=context.vocab_size,
            stats=stats,
        )
        return result if stats else (result, {})
    logps = token_logprobs(output.transpose(0, 1), labels, tp, context.vocab_size)
    softmax = tuple(name for name in stats if name != LOGIT_SUM)
    values = {}
    if softmax:
        target = labels.clamp(min=0)
        values = vocab_parallel_token_stats(output, target, softmax, context.vocab_size, tp)
    if LOGIT_SUM in stats:
        values[LOGIT_SUM] = shard_logit_sums(output, context.vocab_size, tp)
    return logps, values


def sequence_values(
    output, batch: MicroBatch, context, output_layer: OutputLayer | None = None, stats=()
) -> SequenceValues:
    """The micro-batch's :class:`SequenceValues` (``stats``: as :func:`token_values`)."""
    logps, values = token_values(output, batch, context, output_layer, stats)
    mask, cp = batch.loss_mask, context.parallel.cp
    plain, counts = sequence_logprobs(logps, mask, cp, **segments(batch))
    sums = plain
    alpha = context.loss.ld_alpha
    if alpha is not None:
        weights = ld_token_weights(mask, batch.position_ids, counts, alpha, cp, batch.segment_ids)
        sums, _ = sequence_logprobs(logps * weights, mask, cp, **segments(batch))
    return SequenceValues(sums, counts, plain, logps, values)


def sequence_sums(output, batch: MicroBatch, context, output_layer: OutputLayer | None = None):
    """Per-sequence completion log-prob sums (LD-DPO weighted with ``loss.ld_alpha``) and token
    counts, both ``[2B]`` fp32: what the policy's loss and the reference (resident or
    precomputed) use."""
    values = sequence_values(output, batch, context, output_layer)
    return values.sums, values.counts


@torch.no_grad()
def wpo_weight_logps(values: SequenceValues, batch: MicroBatch, context) -> torch.Tensor:
    """WPO's per-sequence ``(1 / n) sum_t (log p_t - log sum_v p_v^2)`` over the ``n``
    completion tokens (TRL's ``mean_logps``; ``n`` clamped to >= 1), detached. ``[2B]`` fp32.
    """
    aligned = values.token_logps.detach() - values.token_stats["log_sum_sq_probs"]
    mask, cp = batch.loss_mask, context.parallel.cp
    sums, _ = sequence_logprobs(aligned, mask, cp, **segments(batch))
    return sums / values.counts.clamp(min=1)


@torch.no_grad()
def logit_metrics(values: SequenceValues, batch: MicroBatch, context) -> dict:
    """TRL's per-token metrics over the valid pairs, as ``[sum, count]`` tensors:
    ``logits/chosen``, ``logits/rejected`` always, ``entropy`` and ``mean_token_accuracy`` when
    computed (``logging.token_metrics``)."""
    mask, cp, tp = batch.loss_mask, context.parallel.cp, context.parallel.tp
    counts = values.counts
    valid = (counts[0::2] > 0) & (counts[1::2] > 0)  # as the loss's valid pairs
    stats = values.token_stats
    logit_sums, _ = sequence_mean_logits(
        stats[LOGIT_SUM], mask, context.vocab_size, tp, cp, **segments(batch)
    )
    metrics = {
        "logits/chosen": token_mean_metric(logit_sums[0::2], counts[0::2], valid),
        "logits/rejected": token_mean_metric(logit_sums[1::2], counts[1::2], valid),
    }
    if "entropy" in stats:
        entropy, _ = sequence_logprobs(stats["entropy"], mask, cp, **segments(batch))
        both = entropy[0::2] + entropy[1::2]
        metrics["entropy"] = token_mean_metric(both, counts[0::2] + counts[1::2], valid)
    if "top1" in stats:
        hits, _ = sequence_logprobs(stats["top1"], mask, cp, **segments(batch))
        metrics["mean_token_accuracy"] = token_mean_metric(hits[0::2], counts[0::2], valid)
    return metrics
