"""Robust DPO (TRL's ``loss_type="robust"``) and its adaptive form.

robust  L = [-(1-eps) logsig(z) + eps logsig(-z)] / (1 - 2 eps),  z = beta (h_w - h_l)
                                                                  arXiv 2403.00409
adapt.  z = beta (c h_w - h_l),  c = sg(rho)                      arXiv 2605.28440

``eps = loss.label_smoothing`` is the assumed rate at which preference labels are flipped. Unlike
conservative DPO (``dpo`` with label smoothing: ``-(1-eps) logsig(z) - eps logsig(-z)``), the
flipped term enters with the opposite sign and the sum is rescaled by ``1 / (1 - 2 eps)``, which
makes the loss an unbiased estimate of the clean-label DPO loss; it can be negative. At
``eps = 0`` it is DPO.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.common import (
    FamilyOutput,
    PairBatch,
    config_coefficients,
    log_coef_ratio,
    log_rho_from_config,
)
from megatron_adadpo.losses.config import LossConfig
from megatron_adadpo.losses.registry import register_loss


def robust_dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    flip_rate: float,
    coef_chosen: Tensor | float = 1.0,
    coef_rejected: Tensor | float = 1.0,
) -> Tensor:
    """``L = [-(1-eps) logsig(z) + eps logsig(-z)] / (1 - 2 eps)``, ``z = beta (a h_w - b h_l)``.

    Robust DPO (Chowdhury et al., https://arxiv.org/abs/2403.00409); ``a / b = c`` from AdaDPO
    (https://arxiv.org/abs/2605.28440). ``flip_rate`` is ``eps`` in ``[0, 0.5)``.

    Shapes:
        chosen_logratios, rejected_logratios: ``[b]`` per pair, ``h = l - l_ref`` summed over
        completion tokens. coef_*: ``[b]`` or scalar. Returns ``[b]`` per-pair losses.
    """
    z = beta * (coef_chosen * chosen_logratios - coef_rejected * rejected_logratios)
    clean = -(1.0 - flip_rate) * F.logsigmoid(z)
    flipped = flip_rate * F.logsigmoid(-z)
    return (clean + flipped) / (1.0 - 2.0 * flip_rate)


@register_loss("robust", needs_reference=True, supports_label_smoothing=True)
def robust_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """Robust DPO on a :class:`PairBatch`; log rho as DPO. ``|dL/dl_w| / |dL/dl_l| = c``."""
    coefs = config_coefficients(log_rho_from_config(batch, config), config)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    losses = robust_dpo_loss(
        h_w,
        h_l,
        beta=config.beta,
        flip_rate=config.label_smoothing,
        coef_chosen=coefs.coef_chosen,
        coef_rejected=coefs.coef_rejected,
    )
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, log_coef_ratio(coefs))
