"""Length-normalised DPO (TRL ``loss_type="sigmoid_norm"``) and its adaptive form.

sigmoid_norm  L = -logsig(beta * (h_w / n_w - h_l / n_l))
adapt.        L = -logsig(beta * (c * h_w / n_w - h_l / n_l))      arXiv 2605.28440
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_adadpo.losses.common import (
    FamilyOutput,
    PairBatch,
    config_coefficients,
    log_rho_from_config,
    logistic_loss,
    pair_difference,
)
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


@register_loss("sigmoid_norm", needs_reference=True, f_divergence=True)
def sigmoid_norm_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """``L = -logsig(beta * delta)``, ``delta = c s_w/n_w - s_l/n_l`` (per-token mean scores).

    ``|dL/dl_w| / |dL/dl_l| = c * n_l / n_w``. Rewards: ``beta * h``.
    Shapes: every tensor ``[b]`` (per pair).
    """
    coefs = config_coefficients(log_rho_from_config(batch, config), config)
    delta, log_balance = pair_difference(batch, config, coefs, per_token=True)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    losses = logistic_loss(config.beta * delta)
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, log_balance)
