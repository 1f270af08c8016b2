"""CPO and its adaptive form (no reference model).

CPO     L = -logsig(beta * (l_w - l_l)) + alpha * NLL(y_w)          arXiv 2401.08417
adapt.  L = -logsig(beta * (c * l_w - l_l)) + alpha * NLL(y_w)      arXiv 2605.28440
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from megatron_adadpo.losses.checks import non_negative
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
class CPOKnobs:
    """``cpo_alpha``: weight of CPO's NLL(y_w) term (>= 0; CPO paper: 1.0)."""

    cpo_alpha: float = 1.0

    def errors(self) -> list[str]:
        return non_negative("cpo_alpha", self.cpo_alpha)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float,
    alpha: float,
    coef_chosen: Tensor | float = 1.0,
    coef_rejected: Tensor | float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``L = -logsig(beta * (a * l_w - b * l_l)) + alpha * NLL(y_w)``.

    CPO (Xu et al., https://arxiv.org/abs/2401.08417); ``a / b = c`` from AdaDPO
    (https://arxiv.org/abs/2605.28440). The NLL term is never weighted by the coefficient.

    Shapes:
        chosen_logps, rejected_logps: ``[b]`` per pair, summed policy log-probs ``l``;
        chosen_nll: ``[b]`` per-pair mean NLL of the chosen completion. Returns ``[b]``.
    """
    z = beta * (coef_chosen * chosen_logps - coef_rejected * rejected_logps)
    return logistic_loss(z, label_smoothing) + alpha * chosen_nll


@register_loss(
    "cpo",
    needs_reference=False,
    needs_chosen_nll=True,
    supports_label_smoothing=True,
    knobs=CPOKnobs,
)
def cpo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """CPO on a :class:`PairBatch`; ``log rho = lbar_w - lbar_l`` (``l_w - l_l`` if sequence).

    Gradient balance of the preference term: ``c``. Rewards: ``beta * l``.
    """
    coefs = config_coefficients(policy_log_rho(batch, config), config)
    l_w, l_l = batch.chosen_logps, batch.rejected_logps
    losses = cpo_loss(
        l_w,
        l_l,
        batch.chosen_nll,
        beta=config.beta,
        alpha=config.knobs.cpo_alpha,
        coef_chosen=coefs.coef_chosen,
        coef_rejected=coefs.coef_rejected,
        label_smoothing=config.label_smoothing,
    )
    return FamilyOutput(losses, config.beta * l_w, config.beta * l_l, coefs, log_coef_ratio(coefs))
