"""Length-normalised DPO (TRL ``loss_type="sigmoid_norm"``) and its adaptive form.

sigmoid_norm  L = -logsig(beta * (h_w / n_w - h_l / n_l))
adapt.        L = -logsig(beta * (c * h_w / n_w - h_l / n_l))      arXiv 2605.28440
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family, logistic_loss
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def sigmoid_norm_loss(delta: Tensor, *, beta: float) -> Tensor:
    """``L = -logsig(beta * delta)``, ``delta = c h_w/n_w - h_l/n_l``. Shapes: ``[b]``."""
    return logistic_loss(beta * delta)


@register_loss("sigmoid_norm", needs_reference=True, f_divergence=True)
def sigmoid_norm_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """``L = -logsig(beta * delta)``, ``delta = c s_w/n_w - s_l/n_l`` (per-token mean scores).

    ``|dL/dl_w| / |dL/dl_l| = c * n_l / n_w``. Rewards: ``beta * h``.
    Shapes: every tensor ``[b]`` (per pair).
    """
    loss = partial(sigmoid_norm_loss, beta=config.beta)
    return difference_family(batch, config, loss, per_token=True)
