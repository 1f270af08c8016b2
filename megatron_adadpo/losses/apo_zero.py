"""APO-zero (TRL ``loss_type="apo_zero"``); no adaptive form.

APO-zero  L = (1 - sig(beta h_w)) + sig(beta h_l)          arXiv 2408.06266 (Eq. 7)

For chosen answers better than the model's own: raise the chosen, lower the rejected likelihood.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, reference_coefficients
from megatron_adadpo.losses.nca_pair import NO_DIFFERENCE
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def apo_zero_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``L = 1 - sig(r_w) + sig(r_l)``, ``r = beta h``. Shapes: ``[b]`` -> ``[b]``."""
    return 1.0 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)


@register_loss("apo_zero", needs_reference=True, no_adaptive=NO_DIFFERENCE)
def apo_zero_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """APO-zero on a :class:`PairBatch`. ``|dL/dh_w| / |dL/dh_l| = sig'(r_w) / sig'(r_l)``."""
    coefs = reference_coefficients(batch, config)
    r_w, r_l = config.beta * batch.chosen_logratios, config.beta * batch.rejected_logratios
    log_slope = lambda r: F.logsigmoid(r) + F.logsigmoid(-r)  # noqa: E731  log sig'(r)
    log_balance = log_slope(r_w) - log_slope(r_l)
    return FamilyOutput(apo_zero_loss(r_w, r_l), r_w, r_l, coefs, log_balance)
