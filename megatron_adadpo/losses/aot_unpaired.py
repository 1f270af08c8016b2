"""AOT, unpaired (TRL ``loss_type="aot_unpaired"``); no adaptive form.

AOT-unpaired  delta_(k) = sort(h_w)_(k) - sort(h_l)_(k)                 arXiv 2406.05882
              L_(k) = -(1-eps) logsig(beta delta_(k)) - eps logsig(-beta delta_(k))

Sorted across the pairs of one micro-batch, as ``aot`` (its docstring: batch dependence,
invalid pairs, why the coefficient and WPO are refused). The k-th loss is reported on the pair
holding the k-th smallest ``h_w``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_adadpo.losses.aot import SORTED_ACROSS_PAIRS, sorted_difference, to_pairs
from megatron_adadpo.losses.common import (
    FamilyOutput,
    PairBatch,
    config_coefficients,
    log_rho_from_config,
    logistic_loss,
)
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


@register_loss(
    "aot_unpaired",
    needs_reference=True,
    supports_label_smoothing=True,
    no_adaptive=SORTED_ACROSS_PAIRS,
    weighting=False,
)
def aot_unpaired_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """AOT-unpaired on a :class:`PairBatch`. Gradient balance: undefined per pair (NaN)."""
    coefs = config_coefficients(log_rho_from_config(batch, config), config)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    delta, order = sorted_difference(h_w, h_l, batch.valid)
    losses = to_pairs(logistic_loss(config.beta * delta, config.label_smoothing), order)
    no_balance = torch.full_like(h_w, float("nan"))
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, no_balance)
