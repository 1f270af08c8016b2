"""DPO and AdaDPO (TRL ``loss_type="sigmoid"``).

DPO     L = -logsig(beta * (h_w - h_l))                       arXiv 2305.18290
AdaDPO  L = -logsig(beta * (c * h_w - h_l)),  c = sg(rho)     arXiv 2605.28440

With ``loss.f_divergence_type`` ``h`` becomes the f-divergence score ``s`` (f-DPO); with
``loss.dpop_lambda`` the sigmoid's argument loses ``beta * lambda * max(0, -h_w)`` (DPOP);
``label_smoothing`` gives cDPO.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family, logistic_loss
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def dpo_loss(delta: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """``L = -(1-eps) logsig(beta * delta) - eps logsig(-beta * delta)``.

    DPO (Rafailov et al., https://arxiv.org/abs/2305.18290) with ``delta = h_w - h_l``; AdaDPO
    (https://arxiv.org/abs/2605.28440) with ``delta = c h_w - h_l``
    (:func:`~megatron_adadpo.losses.common.pair_difference`). ``eps``: cDPO.

    Shapes: delta ``[b]`` per pair; returns ``[b]`` per-pair losses.
    """
    return logistic_loss(beta * delta, label_smoothing)


@register_loss(
    "dpo", needs_reference=True, supports_label_smoothing=True, f_divergence=True, dpop=True
)
def dpo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """DPO / AdaDPO (``name: adadpo``) on a :class:`PairBatch`.

    ``|dL/dl_w| / |dL/dl_l| = a / b = c`` (times the f-divergence slopes, plus DPOP's term).
    """
    eps = config.label_smoothing
    return difference_family(
        batch, config, partial(dpo_loss, beta=config.beta, label_smoothing=eps)
    )
