"""Per-step loss metrics as ``[sum, count]`` tensors, and their reduction.

Contract (ALGORITHM.md section 6):

* Every metric is a tensor of shape ``[2]``.
* Names ending in ``_min`` / ``_max`` hold ``[value, 1]`` and are reduced with MIN / MAX
  (across micro-batches and data-parallel ranks). A rank or micro-batch without valid pairs
  holds ``[+inf, 1]`` / ``[-inf, 1]``, the identities of those reductions.
* Every other metric holds ``[sum over valid pairs, count]`` and is reduced with SUM; its
  value is ``sum / count``. ``pairs/valid`` holds ``[valid pairs, all pairs]``.
* ``loss`` holds ``[sum of per-pair losses, normaliser]``, the normaliser being the family's
  (``LossFamily.normalizer``): the valid pairs, or the valid pairs' chosen completion tokens
  (sft). Summed over the global batch, it is the count the gradient is divided by.

So one stacked SUM all-reduce plus one MIN and one MAX (:func:`all_reduce_metrics`) reduce
everything; :func:`reduce_metrics` turns the result into floats once per step (host sync).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch

MEAN_METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/chosen_per_token",
    "logps/rejected_per_token",
    "ada/coef_mean",
    "ada/log_rho_mean",
    "ada/clip_frac",
    "ada/grad_balance",
    "ada/log_prob_balance",
    "lengths/chosen",
    "lengths/rejected",
)
EXTREMA_METRIC_NAMES = ("ada/coef_min", "ada/coef_max")
METRIC_NAMES = (*MEAN_METRIC_NAMES, "pairs/valid", *EXTREMA_METRIC_NAMES)


def reduce_op(name: str) -> str:
    """``"min"``, ``"max"`` or ``"sum"``: how metric ``name`` is reduced."""
    if name.endswith("_min"):
        return "min"
    if name.endswith("_max"):
        return "max"
    return "sum"


@torch.no_grad()
def pair_metrics(
    batch: PairBatch, out: FamilyOutput, losses: Tensor, normalizer: str = "pairs"
) -> dict[str, Tensor]:
    """Metric tensors of one micro-batch (module docstring). No host sync.

    ``ada/coef_*`` is the effective ratio ``c = coef_chosen / coef_rejected``;
    ``ada/grad_balance`` is ``|dL/dl_w| / |dL/dl_l|`` of the preference term, analytically;
    ``ada/log_prob_balance`` is the same balance in probability space at the geometric-mean
    token, ``log(|dL/dpi_w| / |dL/dpi_l|) = log grad_balance + lbar_l - lbar_w`` (0 = balanced;
    DPO drifts below 0 as the rejected response loses probability, ALGORITHM.md section 2).

    Shapes: batch/out/losses ``[b]`` per pair; every metric ``[2]``.
    """
    valid = batch.valid
    c = out.coefs.coef_chosen / out.coefs.coef_rejected
    per_pair = torch.stack(
        [
            losses,
            out.chosen_rewards,
            out.rejected_rewards,
            out.chosen_rewards - out.rejected_rewards,
            (out.chosen_rewards > out.rejected_rewards).to(losses.dtype),
            batch.chosen_logps,
            batch.rejected_logps,
            batch.chosen_logps / batch.chosen_lengths,
            batch.rejected_logps / batch.rejected_lengths,
            c,
            out.coefs.log_rho,
            out.coefs.clipped.to(losses.dtype),
            torch.exp(out.log_grad_balance),
            (
                out.log_grad_balance
                + batch.rejected_logps / batch.rejected_lengths
                - batch.chosen_logps / batch.chosen_lengths
            ).clamp(-1e4, 1e4),  # c underflows to 0 in sequence mode: keep the sum finite
            batch.chosen_lengths,
            batch.rejected_lengths,
        ]
    ).detach()
    count = valid.sum().to(losses.dtype)
    sums = torch.where(valid, per_pair, 0.0).sum(dim=-1)
    table = torch.stack([sums, count.expand_as(sums)], dim=-1)  # [k, 2]
    metrics = dict(zip(MEAN_METRIC_NAMES, table.unbind(0), strict=True))
    if normalizer == "tokens":
        tokens = torch.where(valid, batch.chosen_lengths, 0.0).sum()
        metrics["loss"] = torch.stack([metrics["loss"][0], tokens])
    metrics["pairs/valid"] = torch.stack([count, torch.full_like(count, valid.numel())])
    one = count.new_ones(())
    c = c.detach()
    metrics["ada/coef_min"] = torch.stack([torch.where(valid, c, torch.inf).amin(), one])
    metrics["ada/coef_max"] = torch.stack([torch.where(valid, c, -torch.inf).amax(), one])
    return metrics


def token_mean_metric(sums: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """``[sum of per-sequence sums, sum of token counts]`` over valid pairs: a per-token mean
    (how TRL averages ``logits/chosen``), under the same SUM reduction as every mean metric.

    Shapes: sums, counts ``[b]`` (per sequence of one side of each pair), valid ``[b]`` bool;
    returns ``[2]``.
    """
    zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
    keep = lambda t: torch.where(valid, t.to(sums.dtype), zero).sum()  # noqa: E731
    return torch.stack([keep(sums), keep(counts)]).detach()


def accumulate_metrics(metrics_list: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Combine micro-batch metrics (SUM, or MIN/MAX for extrema). Shapes: ``[2]`` each."""
    total: dict[str, Tensor] = {}
    for metrics in metrics_list:
        for name, value in metrics.items():
            if name not in total:
                total[name] = value.clone()
            elif reduce_op(name) == "sum":
                total[name] = total[name] + value
            else:
                pick = torch.minimum if reduce_op(name) == "min" else torch.maximum
                total[name] = torch.stack([pick(total[name][0], value[0]), value[1]])
    return total


def stack_metrics(metrics: Mapping[str, Tensor]) -> dict[str, tuple[list[str], Tensor]]:
    """Group metrics by reduce op: ``{"sum"|"min"|"max": (names, stacked [k, 2])}``."""
    groups: dict[str, list[str]] = {}
    for name in metrics:
        groups.setdefault(reduce_op(name), []).append(name)
    return {op: (names, torch.stack([metrics[n] for n in names])) for op, names in groups.items()}


def unstack_metrics(stacked: Mapping[str, tuple[list[str], Tensor]]) -> dict[str, Tensor]:
    """Inverse of :func:`stack_metrics`."""
    return {n: t for names, table in stacked.values() for n, t in zip(names, table, strict=True)}


def all_reduce_metrics(metrics: Mapping[str, Tensor], group=None) -> dict[str, Tensor]:
    """All-reduce metrics over ``group`` (e.g. the data-parallel group): <= 3 collectives.

    A no-op when torch.distributed is not initialised.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(metrics)
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    stacked = stack_metrics(metrics)
    for op, (_, table) in stacked.items():
        dist.all_reduce(table, op=ops[op], group=group)
    return unstack_metrics(stacked)


def reduce_metrics(
    metrics: Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]],
) -> dict[str, float]:
    """Host-side means ``sum / count`` (one device->host copy). Accepts one dict or a list.

    A metric with count 0 (no valid pairs) or an unreduced extremum (+-inf) gives NaN.
    """
    if not isinstance(metrics, Mapping):
        metrics = accumulate_metrics(metrics)
    names = list(metrics)
    table = torch.stack([metrics[n].detach().double() for n in names]).cpu().tolist()
    result = {}
    for name, (value, count) in zip(names, table, strict=True):
        unreduced = reduce_op(name) != "sum" and value in (float("inf"), float("-inf"))
        ok = count > 0 and not unreduced
        result[name] = value / count if ok else float("nan")
    return result
