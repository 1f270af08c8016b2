"""DPO and AdaDPO.

DPO     L = -logsig(beta * (h_w - h_l))                       arXiv 2305.18290
AdaDPO  L = -logsig(beta * (c * h_w - h_l)),  c = sg(rho)     arXiv 2605.28440
"""

from __future__ import annotations

from torch import Tensor

from megatron_adadpo.losses.common import (
    FamilyOutput,
    PairBatch,
    config_coefficients,
    log_coef_ratio,
    log_rho_from_config,
    logistic_loss,
)
from megatron_adadpo.losses.config import LossConfig
from megatron_adadpo.losses.registry import register_loss


def dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    coef_chosen: Tensor | float = 1.0,
    coef_rejected: Tensor | float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``L = -(1-eps) logsig(z) - eps logsig(-z)``, ``z = beta * (a * h_w - b * h_l)``.

    DPO (Rafailov et al., https://arxiv.org/abs/2305.18290) has ``a = b = 1``; AdaDPO
    (https://arxiv.org/abs/2605.28440) uses the detached coefficients of
    :func:`~megatron_adadpo.losses.adaptive.balancing_coefficients` (``a / b = c``). Label
    smoothing ``eps`` gives conservative DPO (cDPO); robust DPO is ``losses/robust.py``.

    Shapes:
        chosen_logratios, rejected_logratios: ``[b]`` per pair, ``h = l - l_ref`` summed over
        completion tokens. coef_*: ``[b]`` or scalar. Returns ``[b]`` per-pair losses.
    """
    z = beta * (coef_chosen * chosen_logratios - coef_rejected * rejected_logratios)
    return logistic_loss(z, label_smoothing)


@register_loss("dpo", needs_reference=True, supports_label_smoothing=True)
def dpo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """DPO / AdaDPO (``name: adadpo``) on a :class:`PairBatch`.

    ``|dL/dl_w| / |dL/dl_l| = a / b = c``.
    """
    coefs = config_coefficients(log_rho_from_config(batch, config), config)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    losses = dpo_loss(
        h_w,
        h_l,
        beta=config.beta,
        coef_chosen=coefs.coef_chosen,
        coef_rejected=coefs.coef_rejected,
        label_smoothing=config.label_smoothing,
    )
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, log_coef_ratio(coefs))
