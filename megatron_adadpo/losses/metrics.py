"""Per-pair loss metrics of one micro-batch as ``[sum, count]`` tensors.

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

Their reduction across micro-batches and ranks (one stacked SUM all-reduce plus one MIN and one
MAX) and the host-side means are :mod:`megatron_adadpo.run.metrics`.
"""

from __future__ import annotations

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
