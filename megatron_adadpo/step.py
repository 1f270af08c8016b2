"""One preference-optimisation step inside Megatron-Core's schedules.

``forward_step`` / ``loss_func`` follow the ``get_forward_backward_func`` contract (no
pipelining, 1F1B, interleaved). The policy's ``GPTModel`` returns vocab-parallel logits on the
last pipeline stage; ``loss_func`` turns them into per-token log-probs with Megatron's
vocab-parallel CE (no vocab gather, TP padding rows masked), sums completion tokens (reduced
over CP), splits the
interleaved ``[c0, r0, c1, r1, ...]`` rows into chosen / rejected, and applies the configured
loss. It returns ``(loss_sum, n_valid_pairs, report)``: with ``calculate_per_token_loss`` the
schedule sums ``n_valid_pairs`` over micro-batches and ``finalize_model_grads`` all-reduces it
over DP x CP and divides the gradients by it, so the loss is the mean over the valid pairs of
the global batch whatever the micro-batch count, DP size or pipeline layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_adadpo.logprobs import sequence_logprobs, token_logprobs
from megatron_adadpo.losses import (
    LossConfig,
    accumulate_metrics,
    all_reduce_metrics,
    preference_loss,
)
from megatron_adadpo.megatron_api import get_forward_backward_func, parallel_state


def policy_forward(model, batch: dict) -> torch.Tensor:
    """Vocab-parallel logits ``[2B, S, v/tp]`` on the last stage (hidden states elsewhere).

    Shapes: tokens / position_ids ``[2B, S]``.
    """
    return model(batch["tokens"], batch["position_ids"], None)


def sequence_sums(
    logits: torch.Tensor, batch: dict, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence completion log-prob sums and token counts, both ``[2B]`` fp32.

    Megatron's vocab-parallel CE over the true vocabulary (TP padding rows masked), summed over
    completion tokens and reduced over the context-parallel group.
    """
    logps = token_logprobs(logits.transpose(0, 1), batch["labels"], vocab_size=vocab_size)
    cp_group = parallel_state.get_context_parallel_group()
    return sequence_logprobs(logps, batch["loss_mask"], cp_group)


def loss_func(loss_config: LossConfig, vocab_size: int, batch: dict, logits: torch.Tensor):
    """``(sum of per-pair losses, number of valid pairs, report)`` for one micro-batch."""
    sums, counts = sequence_sums(logits, batch, vocab_size)
    ref = batch.get("reference_logps")
    chosen_nll = None
    if loss_config.needs_chosen_nll:
        chosen_nll = -sums[0::2] / counts[0::2].clamp(min=1)
    losses, metrics = preference_loss(
        loss_config,
        sums[0::2],
        sums[1::2],
        counts[0::2],
        counts[1::2],
        reference_chosen_logps=None if ref is None else ref[0::2],
        reference_rejected_logps=None if ref is None else ref[1::2],
        chosen_nll=chosen_nll,
    )
    tokens = torch.full_like(losses.detach().sum(), batch["tokens"].numel())  # incl. padding
    metrics["batch/tokens"] = torch.stack([tokens, torch.ones_like(tokens)])
    n_valid = metrics["pairs/valid"][0].to(torch.int)
    report = {"metrics": metrics, "losses": losses.detach(), "pair_ids": batch["pair_ids"]}
    return losses.sum(), n_valid, report


def forward_step(loss_config: LossConfig, vocab_size: int, data_iterator: Iterator, model):
    batch = next(data_iterator)
    return policy_forward(model, batch), partial(loss_func, loss_config, vocab_size, batch)


def _reference_loss_func(vocab_size: int, batch: dict, logits: torch.Tensor):
    sums, _ = sequence_sums(logits, batch, vocab_size)
    zero = torch.zeros((), device=sums.device)
    return zero, torch.zeros((), dtype=torch.int), {"reference_logps": sums.detach()}


def _reference_forward_step(vocab_size: int, data_iterator: Iterator, model):
    batch = next(data_iterator)
    with torch.no_grad():
        output = policy_forward(model, batch)
    return output, partial(_reference_loss_func, vocab_size, batch)


def run_schedule(model: list, batches: list[dict], forward_step_func, forward_only: bool):
    """One pass of Megatron's schedule (no pipelining / 1F1B / interleaved by the layout) over
    ``batches``; returns the loss reports of the last pipeline stage (``[]`` elsewhere)."""
    iterators = [iter(batches) for _ in model]
    tokens = batches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model,
        num_microbatches=len(batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def reduce_reports(reports: list[dict]) -> dict:
    """Micro-batch metrics summed (min/max for extrema), then reduced over DP once."""
    if not reports:
        return {}
    return all_reduce_metrics(
        accumulate_metrics(r["metrics"] for r in reports),
        group=parallel_state.get_data_parallel_group(),
    )


def attach_resident_reference(reference: list, batches: list[dict], vocab_size: int) -> None:
    """Run the frozen reference forward-only on the same micro-batches; store its sums.

    Adds ``batch["reference_logps"]`` (``[2B]`` fp32) on the last pipeline stage, where the
    policy loss is computed.
    """
    step = partial(_reference_forward_step, vocab_size)
    outputs = run_schedule(reference, batches, step, forward_only=True)
    for batch, out in zip(batches, outputs, strict=False):
        batch["reference_logps"] = out["reference_logps"]


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
    loss_config: LossConfig,
    vocab_size: int,
    global_batch_size: int,
    nan_policy: str = "stop",
    step: int = 0,
    stop_requested: bool = False,
) -> StepResult:
    """Forward + backward over this rank's micro-batches, then the optimizer step.

    One collective and host sync per step: all ranks agree on a finite loss (before the
    optimizer steps) and on whether any rank asked to stop (``stop_requested``, e.g. SIGTERM).
    The optimizer's grad-norm computation syncs as Megatron's does.
    """
    for chunk in policy:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    step_func = partial(forward_step, loss_config, vocab_size)
    reports = run_schedule(policy, batches, step_func, forward_only=False)
    metrics = reduce_reports(reports)
    finite, stop = _agree(reports, stop_requested)
    if not finite:
        if nan_policy == "stop":
            raise NonFiniteLoss(_describe_nonfinite(reports, step))
        scheduler.step(increment=global_batch_size)
        return StepResult(metrics, None, skipped=True, stop=stop)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=global_batch_size)
    return StepResult(metrics, grad_norm, skipped=False, stop=stop)


def evaluate(policy: list, batches: list[dict], loss_config: LossConfig, vocab_size: int) -> dict:
    """Forward-only loss metrics of held-out micro-batches, reduced over DP (last stage)."""
    for chunk in policy:
        chunk.eval()
    step_func = partial(forward_step, loss_config, vocab_size)
    reports = run_schedule(policy, batches, step_func, forward_only=True)
    for chunk in policy:
        chunk.train()
    return reduce_reports(reports)


def _agree(reports: list[dict], stop_requested: bool) -> tuple[bool, bool]:
    """(all losses of the step finite on every rank, some rank asked to stop): one MIN
    all-reduce of ``[finite, not stop]``."""
    flags = torch.tensor([1.0, 0.0 if stop_requested else 1.0])
    if torch.cuda.is_available():
        flags = flags.cuda()
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
