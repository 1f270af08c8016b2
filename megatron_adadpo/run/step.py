"""One preference-optimisation step inside Megatron-Core's schedules.

``forward_step`` / ``loss_func`` follow the ``get_forward_backward_func`` contract (no
pipelining, 1F1B, interleaved). The policy's ``GPTModel`` returns vocab-parallel logits on the
last pipeline stage; ``loss_func`` turns them into per-token log-probs with Megatron's
vocab-parallel CE (no vocab gather, TP padding rows masked), sums completion tokens (reduced
over CP), splits the interleaved ``[c0, r0, c1, r1, ...]`` rows into chosen / rejected, and
applies the configured loss; TRL's ``logits/chosen`` / ``logits/rejected`` metrics come from the
same vocab-parallel logits (TP shard sums, never gathered). With
``execution.logprob_chunk_tokens`` the model returns the output layer's input instead and
``loss_func`` applies the output layer chunk by chunk (``chunked_logprobs``). ``loss_func``
returns ``(loss_sum, normaliser, report)``, the normaliser being the loss family's count: the
valid pairs (preference losses) or their chosen completion tokens (sft, a per-token mean). With
``calculate_per_token_loss`` the schedule sums it over micro-batches and
``finalize_model_grads`` all-reduces it over DP x CP and divides the gradients by it, so the
loss is the mean over the global batch whatever the micro-batch count, DP size or pipeline
layout.

The process groups (``ProcessGroupCollection``: ``tp``, ``cp``, ``dp``) are built once by
``platform.distributed.init_model_parallel`` and passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_adadpo.chunked_logprobs import OutputLayer, chunked_token_logprobs, model_output_layer
from megatron_adadpo.logprobs import (
    sequence_logprobs,
    sequence_mean_logits,
    shard_logit_sums,
    token_logprobs,
)
from megatron_adadpo.losses import (
    LossConfig,
    accumulate_metrics,
    all_reduce_metrics,
    preference_loss,
    token_mean_metric,
)
from megatron_adadpo.platform.machine import torch_device
from megatron_adadpo.platform.megatron import (
    ProcessGroupCollection,
    final_hidden_states,
    get_forward_backward_func,
)
from megatron_adadpo.run.context_parallel import full_sequence_length
from megatron_adadpo.run.packing import packed_attention


@dataclass(frozen=True)
class StepContext:
    """What ``loss_func`` needs besides the batch: the loss, the true vocabulary, the groups,
    and whether the output layer and log-probs run in chunks."""

    loss: LossConfig
    vocab_size: int  # the tokenizer's vocabulary (TP padding rows beyond it are masked)
    groups: ProcessGroupCollection
    logprob_chunk_tokens: int = 0  # > 0: chunked output layer + log-probs (chunked_logprobs)

    @classmethod
    def from_config(cls, config, run, groups: ProcessGroupCollection) -> StepContext:
        """The context of a run's ``Config`` and its ``ResolvedRun`` (the settled chunk)."""
        chunk = run.step.logprob_chunk_tokens
        return cls(config.loss, config.model.vocab_size, groups, chunk)


def policy_forward(model, batch: dict, context: StepContext) -> torch.Tensor:
    """The model chunk's output for ``sequence_sums`` (hidden states for the next stage off the
    last stage).

    Last stage: vocab-parallel logits ``[b, S, v/tp]``; with chunked log-probs the output
    layer's input instead, ``[S, b, h]`` (``[S/tp, b, h]`` with sequence parallelism).

    Shapes: tokens / position_ids ``[b, S]``: ``b = 2B`` rows, or one packed row (``b = 1``)
    whose attention is confined to each sequence (``run/packing.py``).
    """
    inputs = (batch["tokens"], batch["position_ids"])
    attention = packed_attention(batch)
    if context.logprob_chunk_tokens:
        return final_hidden_states(model, *inputs, **attention)
    return model(*inputs, **attention)


def sequence_sums(
    output: torch.Tensor,
    batch: dict,
    context: StepContext,
    output_layer: OutputLayer | None = None,
    with_logit_sums: bool = False,
):
    """Per-sequence completion log-prob sums and token counts, both ``[2B]`` fp32
    (``[c0, r0, c1, r1, ...]``, packed or not).

    Megatron's vocab-parallel CE over the true vocabulary (TP padding rows masked), summed over
    completion tokens (per segment of a packed row) and reduced over the context-parallel group.
    ``output`` is ``policy_forward``'s: logits, or with ``output_layer`` the hidden states it is
    applied to chunk by chunk (``chunked_logprobs``). ``with_logit_sums`` also returns this TP
    shard's per-token logit sums ``[b, S]`` (``logprobs.shard_logit_sums``, for
    :func:`mean_logit_metrics`), taken from the same logits or chunks.
    """
    labels, mask, tp = batch["labels"], batch["loss_mask"], context.groups.tp
    if output_layer is None:
        logps = token_logprobs(output.transpose(0, 1), labels, tp, context.vocab_size)
        logit_sums = shard_logit_sums(output, context.vocab_size, tp) if with_logit_sums else None
    else:
        logps, logit_sums = chunked_token_logprobs(
            output,
            output_layer,
            labels,
            mask,
            chunk_tokens=context.logprob_chunk_tokens,
            tp_group=tp,
            vocab_size=context.vocab_size,
            with_logit_sums=True,
        )
    sums, counts = sequence_logprobs(logps, mask, context.groups.cp, **segments(batch))
    return (sums, counts, logit_sums) if with_logit_sums else (sums, counts)


def segments(batch: dict) -> dict:
    """``sequence_logprobs``' per-segment arguments for a packed row (``{}`` otherwise)."""
    if "segment_ids" not in batch:
        return {}
    return {"segment_ids": batch["segment_ids"], "num_sequences": 2 * batch["pair_ids"].numel()}


def output_layer_for(model, context: StepContext) -> OutputLayer | None:
    """The chunked path's output layer of a model chunk (None: unchunked or not last stage)."""
    return model_output_layer(model) if context.logprob_chunk_tokens else None


def mean_logit_metrics(logit_sums: torch.Tensor, batch: dict, context: StepContext) -> dict:
    """TRL's ``logits/chosen`` / ``logits/rejected``: the mean over completion tokens of the mean
    logit over the true vocabulary, over valid pairs, as ``[sum, count]`` metrics.

    Shapes: logit_sums ``[2B, S]``, this TP shard's per-token logit sums
    (``logprobs.shard_logit_sums``; rows ``[c0, r0, c1, r1, ...]``).
    """
    tp, cp = context.groups.tp, context.groups.cp
    mask = batch["loss_mask"]
    sums, counts = sequence_mean_logits(
        logit_sums, mask, context.vocab_size, tp, cp, **segments(batch)
    )
    valid = (counts[0::2] > 0) & (counts[1::2] > 0)  # as the loss's valid pairs
    return {
        "logits/chosen": token_mean_metric(sums[0::2], counts[0::2], valid),
        "logits/rejected": token_mean_metric(sums[1::2], counts[1::2], valid),
    }


def loss_func(
    context: StepContext,
    batch: dict,
    output: torch.Tensor,
    output_layer: OutputLayer | None = None,
):
    """``(sum of per-pair losses, normaliser, report)`` for one micro-batch; the normaliser is
    the family's count (valid pairs, or valid chosen tokens for sft: ``metrics["loss"][1]``)."""
    sums, counts, logit_sums = sequence_sums(
        output, batch, context, output_layer, with_logit_sums=True
    )
    ref = batch.get("reference_logps")
    chosen_nll = None
    if context.loss.needs_chosen_nll:
        chosen_nll = -sums[0::2] / counts[0::2].clamp(min=1)
    losses, metrics = preference_loss(
        context.loss,
        sums[0::2],
        sums[1::2],
        counts[0::2],
        counts[1::2],
        reference_chosen_logps=None if ref is None else ref[0::2],
        reference_rejected_logps=None if ref is None else ref[1::2],
        chosen_nll=chosen_nll,
    )
    metrics.update(mean_logit_metrics(logit_sums, batch, context))
    metrics.update(token_metrics(batch, losses, dist.get_world_size(context.groups.cp)))
    normaliser = metrics["loss"][1].to(torch.int)
    report = {"metrics": metrics, "losses": losses.detach(), "pair_ids": batch["pair_ids"]}
    return losses.sum(), normaliser, report


def token_metrics(batch: dict, losses: torch.Tensor, cp_size: int) -> dict[str, torch.Tensor]:
    """``batch/tokens`` (processed, padding included, all CP ranks) and ``batch/real_tokens``
    (non-padding), each ``[tokens, pairs]``: summed over micro-batches and DP ranks, their mean
    times the global batch size is the step's total whatever the micro-batch count."""
    pairs = torch.full_like(losses.detach().sum(), losses.numel())
    processed = torch.full_like(pairs, batch["tokens"].numel() * cp_size)
    real = batch["real_tokens"].to(pairs)
    return {
        "batch/tokens": torch.stack([processed, pairs]),
        "batch/real_tokens": torch.stack([real, pairs]),
    }


def forward_step(context: StepContext, data_iterator: Iterator, model):
    batch = next(data_iterator)
    output = policy_forward(model, batch, context)
    return output, partial(loss_func, context, batch, output_layer=output_layer_for(model, context))


def run_schedule(model: list, batches: list[dict], forward_step_func, forward_only: bool):
    """One pass of Megatron's schedule (no pipelining / 1F1B / interleaved by the layout) over
    ``batches``; returns the loss reports of the last pipeline stage (``[]`` elsewhere).

    ``seq_length`` is the whole sequence: Megatron sizes the pipeline's p2p buffers
    ``[S/CP (/TP with sequence parallel), 2B, h]`` itself (``schedules.get_tensor_shapes``),
    while each CP rank's batches hold ``[2B, S/CP]`` tokens.
    """
    iterators = [iter(batches) for _ in model]
    tokens = batches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model,
        num_microbatches=len(batches),
        seq_length=full_sequence_length(tokens, model[0].config.context_parallel_size),
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def reduce_reports(reports: list[dict], dp_group) -> dict:
    """Micro-batch metrics summed (min/max for extrema), then reduced over DP once."""
    if not reports:
        return {}
    return all_reduce_metrics(accumulate_metrics(r["metrics"] for r in reports), group=dp_group)


@dataclass
class StepResult:
    metrics: dict  # name -> [2] tensor, reduced over DP (last pipeline stage only, else {})
    grad_norm: float | None
    skipped: bool
    stop: bool = False  # some rank asked to stop after this step (SIGTERM)


class NonFiniteLoss(RuntimeError):
    """The loss of a step was NaN or inf (``train.nan_policy = stop``)."""


def train_step(
    policy: list,
    optimizer,
    scheduler,
    batches: list[dict],
    context: StepContext,
    global_batch_size: int,
    nan_policy: str = "stop",
    step: int = 0,
    stop_requested: bool | Callable[[], bool] = False,
) -> StepResult:
    """Forward + backward over this rank's micro-batches, then the optimizer step.

    One collective and host sync per step: all ranks agree on a finite loss (before the
    optimizer steps) and on whether any rank asked to stop (``stop_requested``, e.g. SIGTERM;
    a callable is read at that moment, so a signal that lands during this step's forward /
    backward stops the run after this step).
    The optimizer's grad-norm computation syncs as Megatron's does.
    """
    for chunk in policy:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(policy, batches, partial(forward_step, context), forward_only=False)
    metrics = reduce_reports(reports, context.groups.dp)
    finite, stop = _agree(reports, stop_requested)
    if not finite:
        if nan_policy == "stop":
            raise NonFiniteLoss(_describe_nonfinite(reports, step))
        scheduler.step(increment=global_batch_size)
        return StepResult(metrics, None, skipped=True, stop=stop)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=global_batch_size)
    return StepResult(metrics, grad_norm, skipped=False, stop=stop)


def evaluate(policy: list, batches: list[dict], context: StepContext) -> dict:
    """Forward-only loss metrics of held-out micro-batches, reduced over DP (last stage)."""
    return reduce_reports(eval_reports(policy, batches, context), context.groups.dp)


def eval_reports(policy: list, batches: list[dict], context: StepContext) -> list[dict]:
    """The loss reports of a forward-only pass over ``batches`` (last stage; else ``[]``),
    not yet reduced: the micro-batches of one evaluation batch may come in several calls."""
    for chunk in policy:
        chunk.eval()
    reports = run_schedule(policy, batches, partial(forward_step, context), forward_only=True)
    for chunk in policy:
        chunk.train()
    return reports


def _agree(reports: list[dict], stop_requested) -> tuple[bool, bool]:
    """(all losses of the step finite on every rank, some rank asked to stop): one MIN
    all-reduce of ``[finite, not stop]``."""
    if callable(stop_requested):
        stop_requested = stop_requested()
    flags = torch.tensor([1.0, 0.0 if stop_requested else 1.0], device=torch_device())
    for r in reports:
        flags[0] = flags[0] * torch.isfinite(r["losses"]).all()
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite, keep_going = flags.tolist()
    return finite == 1.0, keep_going == 0.0


def _describe_nonfinite(reports: list[dict], step: int) -> str:
    bad = [
        int(pid)
        for r in reports
        for pid, loss in zip(r["pair_ids"].tolist(), r["losses"].tolist(), strict=True)
        if not torch.isfinite(torch.tensor(loss))
    ]
    where = f"pair ids {bad}" if bad else "pairs on another rank"
    return (
        f"non-finite loss at step {step} ({where}); set train.nan_policy=skip to skip such "
        "steps, or lower optimizer.lr"
    )
