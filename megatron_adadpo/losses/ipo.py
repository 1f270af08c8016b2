"""IPO (length-normalised) and its adaptive form.

IPO     L = (h_w/n_w - h_l/n_l - 1/(2 tau))^2          arXiv 2310.12036
adapt.  L = (c * h_w/n_w - h_l/n_l - 1/(2 tau))^2      arXiv 2605.28440

tau is ``LossConfig.tau``: ``loss.ipo_tau``, or ``loss.beta`` when ``ipo_tau`` is None (TRL's
``loss_type="ipo"`` convention, where ``beta`` is the paper's tau).
"""

from __future__ import annotations

import torch
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


def ipo_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    tau: float,
    coef_chosen: Tensor | float = 1.0,
    coef_rejected: Tensor | float = 1.0,
) -> Tensor:
    """``L = (a * s_w - b * s_l - 1 / (2 tau))^2`` with ``s = h / n``.

    IPO (Azar et al., https://arxiv.org/abs/2310.12036), length-normalised as in common
    practice (ALGORITHM.md section 4); ``a / b = c`` from AdaDPO
    (https://arxiv.org/abs/2605.28440).

    Shapes:
        chosen_scores, rejected_scores: ``[b]`` per pair, ``s = h / n`` (per-token mean
        log-ratio). Returns ``[b]`` per-pair losses.
    """
    return (coef_chosen * chosen_scores - coef_rejected * rejected_scores - 0.5 / tau) ** 2


@register_loss("ipo", needs_reference=True)
def ipo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """IPO on a :class:`PairBatch`; log rho as DPO; tau = ``config.tau``.

    ``|dL/dl_w| / |dL/dl_l| = (a / n_w) / (b / n_l) = c * n_l / n_w``. Rewards: ``beta * h``.
    """
    coefs = config_coefficients(log_rho_from_config(batch, config), config)
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    n_w, n_l = batch.chosen_lengths, batch.rejected_lengths
    losses = ipo_loss(
        h_w / n_w,
        h_l / n_l,
        tau=config.tau,
        coef_chosen=coefs.coef_chosen,
        coef_rejected=coefs.coef_rejected,
    )
    log_balance = log_coef_ratio(coefs) + torch.log(n_l) - torch.log(n_w)
    return FamilyOutput(losses, config.beta * h_w, config.beta * h_l, coefs, log_balance)
