"""One preference-optimisation step inside Megatron-Core's schedules.

``forward_step`` / ``loss_func`` follow the ``get_forward_backward_func`` contract (no
pipelining, 1F1B, interleaved). The policy's ``GPTModel`` returns vocab-parallel logits on the
last pipeline stage; ``loss_func`` turns them into per-token log-probs with Megatron's
vocab-parallel CE (no vocab gather, TP padding rows masked), sums completion tokens (reduced
over CP; ``run/sequences.py``: LD-DPO's weights, WPO's per-sequence weights), splits the
interleaved ``[c0, r0, c1, r1, ...]`` rows into chosen / rejected, and applies the configured
loss; TRL's ``logits/*``, ``entropy`` and ``mean_token_accuracy`` metrics come from the same
vocab-parallel logits (TP reductions, never gathered). With
``execution.logprob_chunk_tokens`` the model returns the output layer's input instead and
``loss_func`` applies the output layer chunk by chunk (``chunked_logprobs``). ``loss_func``
returns ``(loss_sum, normaliser, report)``, the normaliser being the loss family's count: the
valid pairs (preference losses) or their chosen completion tokens (sft, a per-token mean). With
``calculate_per_token_loss`` the schedule sums it over micro-batches and
``finalize_model_grads`` all-reduces it over DP x CP and divides the gradients by it, so the
loss is the mean over the global batch whatever the micro-batch count, DP size or pipeline
layout.

The parallel value (``platform/parallel.py``: groups ``tp``, ``cp``, ``dp``, degrees, this
rank's coordinates) is built once by ``platform.distributed.init_model_parallel`` and passed in;
the micro-batches are ``MicroBatch`` values (``run/microbatch.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_adadpo.chunked_logprobs import OutputLayer, model_output_layer
from megatron_adadpo.losses import LossConfig, preference_loss
from megatron_adadpo.platform.machine import torch_device
from megatron_adadpo.platform.megatron import final_hidden_states, get_forward_backward_func
from megatron_adadpo.platform.parallel import Parallel
from megatron_adadpo.run.metrics import accumulate_metrics, all_reduce_metrics
from megatron_adadpo.run.microbatch import MicroBatch
from megatron_adadpo.run.sequences import (
    logit_metrics,
    sequence_values,
    step_stats,
    wpo_weight_logps,
)


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides its batches and optimizer: the loss, the true vocabulary, the
    parallel value, whether the output layer and log-probs run in chunks, whether the per-token
    softmax metrics (``entropy``, ``mean_token_accuracy``) are computed, the global batch (pairs
    the scheduler advances by) and what a non-finite loss does. Made once per run
    (``from_config``: the config and its resolved run)."""

    loss: LossConfig
    vocab_size: int  # the tokenizer's vocabulary (TP padding rows beyond it are masked)
    parallel: Parallel
    logprob_chunk_tokens: int = 0  # > 0: chunked output layer + log-probs (chunked_logprobs)
    token_metrics: bool = True  # logging.token_metrics
    global_batch_size: int = 1  # train.global_batch_size (pairs per optimizer step)
    nan_policy: str = "stop"  # train.nan_policy: "stop" | "skip"

    @classmethod
    def from_config(cls, config, run, parallel: Parallel) -> StepContext:
        """The context of a run's ``Config`` and its ``ResolvedRun`` (the settled chunk)."""
        return cls(
            config.loss,
            config.model.vocab_size,
            parallel,
            run.step.logprob_chunk_tokens,
            config.logging.token_metrics,
            config.train.global_batch_size,
            config.train.nan_policy,
        )


def policy_forward(model, batch: MicroBatch, context: StepContext) -> torch.Tensor:
    """The model chunk's output for ``sequences.sequence_values`` (hidden states for the next
    stage off the last stage).

    Last stage: vocab-parallel logits ``[b, S, v/tp]``; with chunked log-probs the output
    layer's input instead, ``[S, b, h]`` (``[S/tp, b, h]`` with sequence parallelism).

    Shapes: tokens / position_ids ``[b, S]``: ``b = 2B`` rows, or one packed row (``b = 1``)
    whose attention is confined to each sequence (``MicroBatch.attention_inputs``).
    """
    inputs = (batch.tokens, batch.position_ids)
    attention = batch.attention_inputs()
    if context.logprob_chunk_tokens:
        return final_hidden_states(model, *inputs, **attention)
    return model(*inputs, **attention)


def output_layer_for(model, context: StepContext) -> OutputLayer | None:
    """The chunked path's output layer of a model chunk (None: unchunked or not last stage)."""
    return model_output_layer(model) if context.logprob_chunk_tokens else None


def loss_func(
    context: StepContext,
    batch: MicroBatch,
    output: torch.Tensor,
    output_layer: OutputLayer | None = None,
):
    """``(sum of per-pair losses, normaliser, report)`` for one micro-batch; the normaliser is
    the family's count (valid pairs, or valid chosen tokens for sft: ``metrics["loss"][1]``).

    The pair scores are the completion log-prob sums (LD-DPO weighted with ``loss.ld_alpha``);
    ``chosen_nll`` (cpo, orpo) is the unweighted per-token mean, as TRL's NLL term; WPO's
    per-sequence weights go in with ``loss.use_weighting`` (``run/sequences.py``).
    """
    values = sequence_values(output, batch, context, output_layer, step_stats(context))
    sums, counts = values.sums, values.counts
    ref = batch.reference_logps
    extra = {}
    if context.loss.needs_chosen_nll:
        extra["chosen_nll"] = -values.plain_sums[0::2] / counts[0::2].clamp(min=1)
    if context.loss.use_weighting:
        weight_logps = wpo_weight_logps(values, batch, context)
        extra["chosen_weight_logps"] = weight_logps[0::2]
        extra["rejected_weight_logps"] = weight_logps[1::2]
    losses, metrics = preference_loss(
        context.loss,
        sums[0::2],
        sums[1::2],
        counts[0::2],
        counts[1::2],
        reference_chosen_logps=None if ref is None else ref[0::2],
        reference_rejected_logps=None if ref is None else ref[1::2],
        **extra,
    )
    metrics.update(logit_metrics(values, batch, context))
    metrics.update(token_metrics(batch, losses))
    normaliser = metrics["loss"][1].to(torch.int)
    report = {"metrics": metrics, "losses": losses.detach(), "pair_ids": batch.pair_ids}
    return losses.sum(), normaliser, report


def token_metrics(batch: MicroBatch, losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """``batch/tokens`` (processed, padding included, all CP ranks) and ``batch/real_tokens``
    (non-padding), each ``[tokens, pairs]``: summed over micro-batches and DP ranks, their mean
    times the global batch size is the step's total whatever the micro-batch count."""
    pairs = torch.full_like(losses.detach().sum(), losses.numel())
    processed = torch.full_like(pairs, batch.tokens.shape[0] * batch.sequence_length)
    real = batch.real_tokens.to(pairs)
    return {
        "batch/tokens": torch.stack([processed, pairs]),
        "batch/real_tokens": torch.stack([real, pairs]),
    }


def forward_step(context: StepContext, data_iterator: Iterator, model):
    batch = next(data_iterator)
    output = policy_forward(model, batch, context)
    return output, partial(loss_func, context, batch, output_layer=output_layer_for(model, context))


def run_schedule(model: list, batches: list[MicroBatch], forward_step_func, forward_only: bool):
    """One pass of Megatron's schedule (no pipelining / 1F1B / interleaved by the layout) over
    ``batches``; returns the loss reports of the last pipeline stage (``[]`` elsewhere).

    ``seq_length`` is the whole sequence: Megatron sizes the pipeline's p2p buffers
    ``[S/CP (/TP with sequence parallel), 2B, h]`` itself (``schedules.get_tensor_shapes``),
    while each CP rank's batches hold ``[2B, S/CP]`` tokens (``MicroBatch.sequence_length``).
    """
    iterators = [iter(batches) for _ in model]
    first = batches[0]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model,
        num_microbatches=len(batches),
        seq_length=first.sequence_length,
        micro_batch_size=first.tokens.shape[0],
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
    batches: list[MicroBatch],
    context: StepContext,
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
    metrics = reduce_reports(reports, context.parallel.dp)
    finite, stop = _agree(reports, stop_requested)
    if not finite:
        if context.nan_policy == "stop":
            raise NonFiniteLoss(_describe_nonfinite(reports, step))
        scheduler.step(increment=context.global_batch_size)
        return StepResult(metrics, None, skipped=True, stop=stop)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=context.global_batch_size)
    return StepResult(metrics, grad_norm, skipped=False, stop=stop)


def evaluate(policy: list, batches: list[MicroBatch], context: StepContext) -> dict:
    """Forward-only loss metrics of held-out micro-batches, reduced over DP (last stage)."""
    return reduce_reports(eval_reports(policy, batches, context), context.parallel.dp)


def eval_reports(policy: list, batches: list[MicroBatch], context: StepContext) -> list[dict]:
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
