"""EXO, pairwise (TRL ``loss_type="exo_pair"``) and its adaptive form.

EXO     L = KL(q || p) = q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)
        q_w = sig(z), q_l = sig(-z), z = beta * (h_w - h_l)     arXiv 2402.00856 (Eq. 16)
adapt.  z = beta * (c * h_w - h_l)                               arXiv 2605.28440

``eps = loss.label_smoothing`` must be > 0 (the paper recommends 1e-3), as TRL requires.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.checks import bad
from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def exo_pair_loss(delta: Tensor, *, beta: float, eps: float) -> Tensor:
    """``L = sig(z) (logsig(z) - log(1-eps)) + sig(-z) (logsig(-z) - log eps)``, ``z = beta
    delta``. Shapes: ``[b]`` -> ``[b]``."""
    z = beta * delta
    chosen = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    return chosen + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def exo_pair_errors(config: LossConfig) -> list[str]:
    """EXO's target ``[1 - eps, eps]`` needs ``eps > 0`` (TRL refuses 0 likewise)."""
    if config.label_smoothing > 0:
        return []
    return [
        bad(
            "label_smoothing",
            config.label_smoothing,
            "a float in (0, 0.5) for name='exo_pair': EXO's eps (the paper recommends 1e-3)",
        )
    ]


@register_loss(
    "exo_pair",
    needs_reference=True,
    supports_label_smoothing=True,
    f_divergence=True,
    checks=exo_pair_errors,
)
def exo_pair_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """EXO on a :class:`PairBatch`; log rho as DPO. ``|dL/dl_w| / |dL/dl_l| = c``."""
    loss = partial(exo_pair_loss, beta=config.beta, eps=config.label_smoothing)
    return difference_family(batch, config, loss)
