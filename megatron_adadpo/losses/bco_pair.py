"""BCO, pairwise (TRL ``loss_type="bco_pair"``); no adaptive form.

BCO  L = -logsig(beta h_w) - logsig(-beta h_l)        arXiv 2404.04656 (TRL 1.16.0's form)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, reference_coefficients
from megatron_adadpo.losses.nca_pair import NO_DIFFERENCE
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def bco_pair_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``L = -logsig(r_w) - logsig(-r_l)``, ``r = beta h``. Shapes: ``[b]`` -> ``[b]``."""
    return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)


@register_loss("bco_pair", needs_reference=True, no_adaptive=NO_DIFFERENCE)
def bco_pair_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """BCO on a :class:`PairBatch`. ``|dL/dh_w| / |dL/dh_l| = sig(-r_w) / sig(r_l)``."""
    coefs = reference_coefficients(batch, config)
    r_w, r_l = config.beta * batch.chosen_logratios, config.beta * batch.rejected_logratios
    log_balance = F.logsigmoid(-r_w) - F.logsigmoid(r_l)
    return FamilyOutput(bco_pair_loss(r_w, r_l), r_w, r_l, coefs, log_balance)
