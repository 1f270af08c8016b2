"""APO-down (TRL ``loss_type="apo_down"``) and its adaptive form.

APO-down  L = sig(beta h_w) + 1 - sig(beta (h_w - h_l))        arXiv 2408.06266 (Eq. 8)
adapt.    L = sig(beta h_w) + 1 - sig(beta (c h_w - h_l))      arXiv 2605.28440

For chosen answers worse than the model's own: lower the chosen likelihood, the rejected one
more. The coefficient multiplies ``h_w`` in the difference term only (the anchor term
``sig(beta h_w)`` has no pair to balance).
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


def apo_down_loss(chosen_rewards: Tensor, margin: Tensor) -> Tensor:
    """``L = sig(r_w) + 1 - sig(z)``, ``r_w = beta h_w``, ``z = beta (c h_w - h_l)``.

    Shapes: ``[b]`` each -> ``[b]``.
    """
    return torch.sigmoid(chosen_rewards) + 1.0 - torch.sigmoid(margin)


@register_loss("apo_down", needs_reference=True)
def apo_down_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """APO-down on a :class:`PairBatch`; log rho as DPO.

    ``|dL/dh_w| / |dL/dh_l| = |sig'(r_w) - a sig'(z)| / (b sig'(z))``.
    """
    coefs = reference_coefficients(batch, config)
    a, b = coefs.coef_chosen, coefs.coef_rejected
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    r_w, z = config.beta * h_w, config.beta * (a * h_w - b * h_l)
    slope = lambda x: torch.exp(F.logsigmoid(x) + F.logsigmoid(-x))  # noqa: E731  sig'(x)
    log_balance = torch.log(torch.abs(slope(r_w) - a * slope(z))) - torch.log(b * slope(z))
    losses = apo_down_loss(r_w, z)
    return FamilyOutput(losses, r_w, config.beta * h_l, coefs, log_balance)
