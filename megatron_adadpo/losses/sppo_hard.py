"""SPPO with hard preference probabilities (TRL ``loss_type="sppo_hard"``); no adaptive form.

SPPO  L = (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2       arXiv 2405.00675 (Eq. 4.7, P = 1/0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, reference_coefficients
from megatron_adadpo.losses.nca_pair import NO_DIFFERENCE
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """``L = (h_w - 0.5/beta)^2 + (h_l + 0.5/beta)^2``. Shapes: ``[b]`` each -> ``[b]``."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


@register_loss("sppo_hard", needs_reference=True, no_adaptive=NO_DIFFERENCE)
def sppo_hard_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """SPPO on a :class:`PairBatch`. ``|dL/dh_w| / |dL/dh_l| = |h_w - 0.5/beta| /
    |h_l + 0.5/beta|``. Rewards: ``beta * h``."""
    coefs = reference_coefficients(batch, config)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    half = 0.5 / config.beta
    log_balance = torch.log(torch.abs(h_w - half)) - torch.log(torch.abs(h_l + half))
    losses = sppo_hard_loss(h_w, h_l, beta=config.beta)
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, log_balance)
