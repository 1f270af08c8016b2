"""Robust DPO (TRL's ``loss_type="robust"``) and its adaptive form.

robust  L = [-(1-eps) logsig(z) + eps logsig(-z)] / (1 - 2 eps),  z = beta (h_w - h_l)
                                                                  arXiv 2403.00409
adapt.  z = beta (c h_w - h_l),  c = sg(rho)                      arXiv 2605.28440

``eps = loss.label_smoothing`` is the assumed rate at which preference labels are flipped. Unlike
conservative DPO (``dpo`` with label smoothing: ``-(1-eps) logsig(z) - eps logsig(-z)``), the
flipped term enters with the opposite sign and the sum is rescaled by ``1 / (1 - 2 eps)``, which
makes the loss an unbiased estimate of the clean-label DPO loss; it can be negative. At
``eps = 0`` it is DPO. f-divergences and DPOP enter ``z`` as in ``dpo``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def robust_dpo_loss(delta: Tensor, *, beta: float, flip_rate: float) -> Tensor:
    """``L = [-(1-eps) logsig(z) + eps logsig(-z)] / (1 - 2 eps)``, ``z = beta * delta``.

    Robust DPO (Chowdhury et al., https://arxiv.org/abs/2403.00409); ``delta = c h_w - h_l``
    with AdaDPO's coefficient (https://arxiv.org/abs/2605.28440). ``flip_rate``: ``[0, 0.5)``.

    Shapes: delta ``[b]`` per pair; returns ``[b]`` per-pair losses.
    """
    z = beta * delta
    clean = -(1.0 - flip_rate) * F.logsigmoid(z)
    flipped = flip_rate * F.logsigmoid(-z)
    return (clean + flipped) / (1.0 - 2.0 * flip_rate)


@register_loss(
    "robust", needs_reference=True, supports_label_smoothing=True, f_divergence=True, dpop=True
)
def robust_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """Robust DPO on a :class:`PairBatch`; log rho as DPO. ``|dL/dl_w| / |dL/dl_l| = c``."""
    loss = partial(robust_dpo_loss, beta=config.beta, flip_rate=config.label_smoothing)
    return difference_family(batch, config, loss)
