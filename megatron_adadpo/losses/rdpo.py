"""R-DPO (length-regularised DPO) and its adaptive form.

R-DPO   L = -logsig(beta * (h_w - h_l) + alpha * (n_w - n_l))       arXiv 2403.19159
adapt.  L = -logsig(beta * (c * h_w - h_l) + alpha * (n_w - n_l))   arXiv 2605.28440
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


def rdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    alpha: float,
    coef_chosen: Tensor | float = 1.0,
    coef_rejected: Tensor | float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``L = -logsig(z)``, ``z = beta * (a * h_w - b * h_l) + alpha * (n_w - n_l)``.

    R-DPO (Park et al., https://arxiv.org/abs/2403.19159) in the form of ALGORITHM.md section 4
    (the SimPO paper's table of losses); ``a / b = c`` from AdaDPO
    (https://arxiv.org/abs/2605.28440). ``eps`` label smoothing as in DPO.

    Shapes:
        chosen_logratios, rejected_logratios: ``[b]`` per pair (summed ``h``);
        chosen_lengths, rejected_lengths: ``[b]`` completion token counts. Returns ``[b]``.
    """
    z = beta * (coef_chosen * chosen_logratios - coef_rejected * rejected_logratios)
    z = z + alpha * (chosen_lengths - rejected_lengths)
    return logistic_loss(z, label_smoothing)


@register_loss("rdpo", needs_reference=True, supports_label_smoothing=True)
def rdpo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """R-DPO on a :class:`PairBatch`; log rho as DPO. ``|dL/dl_w| / |dL/dl_l| = c``."""
    coefs = config_coefficients(log_rho_from_config(batch, config), config)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    losses = rdpo_loss(
        h_w,
        h_l,
        batch.chosen_lengths,
        batch.rejected_lengths,
        beta=config.beta,
        alpha=config.rdpo_alpha,
        coef_chosen=coefs.coef_chosen,
        coef_rejected=coefs.coef_rejected,
        label_smoothing=config.label_smoothing,
    )
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, log_coef_ratio(coefs))
