"""NCA, pairwise (TRL ``loss_type="nca_pair"``); no adaptive form.

NCA  L = -logsig(beta h_w) - 0.5 logsig(-beta h_w) - 0.5 logsig(-beta h_l)   arXiv 2402.05369
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, reference_coefficients
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig

NO_DIFFERENCE = (
    "it scores each answer's log-ratio on its own (no chosen-minus-rejected difference for "
    "the coefficient to balance)"
)


def nca_pair_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``L = -logsig(r_w) - 0.5 logsig(-r_w) - 0.5 logsig(-r_l)``, ``r = beta h``.

    Shapes: ``[b]`` per pair each; returns ``[b]``.
    """
    r_w, r_l = chosen_rewards, rejected_rewards
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_loss("nca_pair", needs_reference=True, no_adaptive=NO_DIFFERENCE)
def nca_pair_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """NCA on a :class:`PairBatch`. ``|dL/dh_w| / |dL/dh_l| = |0.5 sig(r_w) - sig(-r_w)| /
    (0.5 sig(r_l))``."""
    coefs = reference_coefficients(batch, config)
    r_w, r_l = config.beta * batch.chosen_logratios, config.beta * batch.rejected_logratios
    log_chosen = torch.log(torch.abs(0.5 * torch.sigmoid(r_w) - torch.sigmoid(-r_w)))
    log_balance = log_chosen - torch.log(0.5 * torch.sigmoid(r_l))
    return FamilyOutput(nca_pair_loss(r_w, r_l), r_w, r_l, coefs, log_balance)
