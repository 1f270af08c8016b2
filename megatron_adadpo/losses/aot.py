"""AOT, paired (TRL ``loss_type="aot"``); no adaptive form.

AOT  delta_(k) = sort(l_w - l_l)_(k) - sort(l_ref_w - l_ref_l)_(k)      arXiv 2406.05882
     L_(k) = -(1-eps) logsig(beta delta_(k)) - eps logsig(-beta delta_(k))

The margins are sorted across the pairs of one micro-batch (TRL: of one device's batch), so a
pair's loss depends on the other pairs it is batched with: the loss changes with the micro-batch
size (not with DP, PP or the number of micro-batches of a fixed size). The k-th loss is
reported on the pair holding the k-th smallest policy margin; invalid pairs are sorted last
(in both sorts) and get loss 0. The AdaDPO coefficient and WPO's per-pair weights are refused:
after the sort a loss no longer belongs to one pair's two answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_adadpo.losses.common import (
    FamilyOutput,
    PairBatch,
    logistic_loss,
    reference_coefficients,
)
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig

SORTED_ACROSS_PAIRS = (
    "it sorts margins across the pairs of a micro-batch, so a loss term no longer holds one "
    "pair's chosen and rejected answer for the coefficient to balance"
)


def sorted_difference(first: Tensor, second: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``(sort(first) - sort(second), order of first)`` with invalid entries sorted last (their
    difference is 0). Shapes: ``[b]`` each; returns ``[b]`` (rank order) and ``[b]`` indices."""
    last = torch.finfo(first.dtype).max
    sorted_first, order = torch.sort(torch.where(valid, first, last))
    sorted_second, _ = torch.sort(torch.where(valid, second, last))
    return sorted_first - sorted_second, order


def to_pairs(rank_losses: Tensor, order: Tensor) -> Tensor:
    """The k-th loss onto the pair ``order[k]``. Shapes: ``[b]`` each; returns ``[b]``."""
    return torch.zeros_like(rank_losses).scatter(0, order, rank_losses)


def sorted_family_output(
    first: Tensor, second: Tensor, batch: PairBatch, config: LossConfig
) -> FamilyOutput:
    """Both AOT forms: the logistic loss of ``beta * (sort(first) - sort(second))``, the k-th
    onto the pair holding the k-th smallest ``first``; rewards ``beta * h``. Gradient balance:
    undefined per pair (NaN). Shapes: ``[b]`` each."""
    coefs = reference_coefficients(batch, config)
    delta, order = sorted_difference(first, second, batch.valid)
    losses = to_pairs(logistic_loss(config.beta * delta, config.label_smoothing), order)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    no_balance = torch.full_like(h_w, float("nan"))
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, no_balance)


# Both AOT forms: a reference, cDPO's eps, no adaptive form, no WPO weights.
SORTED_FAMILY = {
    "needs_reference": True,
    "supports_label_smoothing": True,
    "no_adaptive": SORTED_ACROSS_PAIRS,
    "weighting": False,
}


@register_loss("aot", **SORTED_FAMILY)
def aot_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """AOT on a :class:`PairBatch`: sorted policy margins minus sorted reference margins."""
    margins = batch.chosen_logps - batch.rejected_logps
    ref_margins = batch.reference_chosen_logps - batch.reference_rejected_logps
    return sorted_family_output(margins, ref_margins, batch, config)
