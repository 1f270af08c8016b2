"""SimPO and its adaptive form (no reference model).

SimPO   L = -logsig(beta * (lbar_w - lbar_l) - gamma),  lbar = l / n     arXiv 2405.14734
adapt.  L = -logsig(beta * (c * lbar_w - lbar_l) - gamma)                arXiv 2605.28440
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_adadpo.losses.checks import finite_float
from megatron_adadpo.losses.common import (
    FamilyOutput,
    PairBatch,
    config_coefficients,
    log_coef_ratio,
    logistic_loss,
    policy_log_rho,
)
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


@dataclass(frozen=True)
class SimPOKnobs:
    """``simpo_gamma``: SimPO's target reward margin gamma. Default 0.05 = 0.5 * beta, the
    gamma/beta ratio the SimPO paper recommends; for its recipe use beta=2.0, simpo_gamma=1.0."""

    simpo_gamma: float = 0.05

    def errors(self) -> list[str]:
        return finite_float("simpo_gamma", self.simpo_gamma)


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float,
    gamma: float,
    coef_chosen: Tensor | float = 1.0,
    coef_rejected: Tensor | float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``L = -logsig(z)``, ``z = beta * (a * lbar_w - b * lbar_l) - gamma``.

    SimPO (Meng et al., https://arxiv.org/abs/2405.14734); ``a / b = c`` from AdaDPO
    (https://arxiv.org/abs/2605.28440). ``eps`` label smoothing as in DPO.

    Shapes:
        chosen_avg_logps, rejected_avg_logps: ``[b]`` per pair, ``lbar = l / n`` (per-token
        mean policy log-prob). Returns ``[b]`` per-pair losses.
    """
    z = beta * (coef_chosen * chosen_avg_logps - coef_rejected * rejected_avg_logps) - gamma
    return logistic_loss(z, label_smoothing)


@register_loss("simpo", needs_reference=False, supports_label_smoothing=True, knobs=SimPOKnobs)
def simpo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """SimPO on a :class:`PairBatch`; ``log rho = lbar_w - lbar_l`` (``l_w - l_l`` if sequence).

    ``|dL/dl_w| / |dL/dl_l| = c * n_l / n_w``. Rewards: ``beta * lbar``.
    """
    coefs = config_coefficients(policy_log_rho(batch, config), config)
    n_w, n_l = batch.chosen_lengths, batch.rejected_lengths
    lbar_w, lbar_l = batch.chosen_logps / n_w, batch.rejected_logps / n_l
    losses = simpo_loss(
        lbar_w,
        lbar_l,
        beta=config.beta,
        gamma=config.knobs.simpo_gamma,
        coef_chosen=coefs.coef_chosen,
        coef_rejected=coefs.coef_rejected,
        label_smoothing=config.label_smoothing,
    )
    log_balance = log_coef_ratio(coefs) + torch.log(n_l) - torch.log(n_w)
    return FamilyOutput(losses, config.beta * lbar_w, config.beta * lbar_l, coefs, log_balance)
