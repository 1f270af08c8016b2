"""ORPO and its adaptive form (no reference model).

ORPO    L = NLL(y_w) - lambda * logsig(lo_w - lo_l),  lo = lbar - log(1 - exp(lbar))
                                                                   arXiv 2403.07691
adapt.  L = NLL(y_w) - lambda * logsig(c * lo_w - lo_l)           arXiv 2605.28440
log rho = [lbar_w + log1mexp(lbar_w)] - [lbar_l + log1mexp(lbar_l)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.checks import non_negative
from megatron_adadpo.losses.common import (
    FamilyOutput,
    PairBatch,
    config_coefficients,
    log_coef_ratio,
)
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig

MAX_AVG_LOGP = -1e-6  # lbar is clamped to <= this so that log(1 - exp(lbar)) is finite


@dataclass(frozen=True)
class ORPOKnobs:
    """``orpo_lambda``: weight of ORPO's odds-ratio term (>= 0; ORPO paper: 0.1)."""

    orpo_lambda: float = 0.1

    def errors(self) -> list[str]:
        return non_negative("orpo_lambda", self.orpo_lambda)


def log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate everywhere (Maechler 2012).

    ``log(-expm1(a))`` for ``a > -ln 2``, else ``log1p(-exp(a))``. Both branches are evaluated
    on inputs that are safe for them, so neither the value nor the gradient holds NaN.

    Shapes: elementwise.
    """
    near_zero = a > -math.log(2.0)
    a_near = torch.where(near_zero, a, -1.0)  # safe argument for the unused branch
    a_far = torch.where(near_zero, -1.0, a)
    return torch.where(near_zero, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def orpo_log_odds(avg_logps: Tensor) -> Tensor:
    """``lo = lbar - log1mexp(lbar)`` with ``lbar`` clamped to <= -1e-6. Shapes: ``[b]``."""
    lbar = avg_logps.clamp(max=MAX_AVG_LOGP)
    return lbar - log1mexp(lbar)


def orpo_loss(
    chosen_log_odds: Tensor,
    rejected_log_odds: Tensor,
    chosen_nll: Tensor,
    *,
    lam: float,
    coef_chosen: Tensor | float = 1.0,
    coef_rejected: Tensor | float = 1.0,
) -> Tensor:
    """``L = NLL(y_w) - lambda * logsig(a * lo_w - b * lo_l)``.

    ORPO (Hong et al., https://arxiv.org/abs/2403.07691); ``a / b = c`` from AdaDPO
    (https://arxiv.org/abs/2605.28440). The NLL term is never weighted by the coefficient.

    Shapes:
        chosen_log_odds, rejected_log_odds: ``[b]`` per pair (:func:`orpo_log_odds` of the
        per-token mean log-prob); chosen_nll: ``[b]`` per-pair mean NLL. Returns ``[b]``.
    """
    z = coef_chosen * chosen_log_odds - coef_rejected * rejected_log_odds
    return chosen_nll - lam * F.logsigmoid(z)


@register_loss("orpo", needs_reference=False, needs_chosen_nll=True, knobs=ORPOKnobs)
def orpo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """ORPO on a :class:`PairBatch`.

    ``log rho = [lbar_w + log1mexp(lbar_w)] - [lbar_l + log1mexp(lbar_l)]`` (the odds
    derivative ratio, ALGORITHM.md section 4); ``balance_space``/``normalize`` do not apply.
    Gradient balance of the odds-ratio term, ``|dL/dl_w| / |dL/dl_l|`` with
    ``dlo/dl = 1 / (n (1 - exp(lbar)))``: ``c * n_l (1 - P_l) / (n_w (1 - P_w))``.
    Rewards: the log-odds ``lo``.
    """
    n_w, n_l = batch.chosen_lengths, batch.rejected_lengths
    lbar_w = (batch.chosen_logps / n_w).clamp(max=MAX_AVG_LOGP)
    lbar_l = (batch.rejected_logps / n_l).clamp(max=MAX_AVG_LOGP)
    l1m_w, l1m_l = log1mexp(lbar_w), log1mexp(lbar_l)
    coefs = config_coefficients((lbar_w + l1m_w) - (lbar_l + l1m_l), config)
    lo_w, lo_l = lbar_w - l1m_w, lbar_l - l1m_l
    losses = orpo_loss(
        lo_w,
        lo_l,
        batch.chosen_nll,
        lam=config.knobs.orpo_lambda,
        coef_chosen=coefs.coef_chosen,
        coef_rejected=coefs.coef_rejected,
    )
    log_balance = log_coef_ratio(coefs) + torch.log(n_l) + l1m_l - torch.log(n_w) - l1m_w
    return FamilyOutput(losses, lo_w, lo_l, coefs, log_balance)
