"""Hinge (SLiC) loss (TRL ``loss_type="hinge"``) and its adaptive form.

hinge   L = max(0, 1 - beta * (h_w - h_l))             SLiC-HF, arXiv 2305.10425
adapt.  L = max(0, 1 - beta * (c * h_w - h_l))         arXiv 2605.28440

f-divergences replace ``h`` by the score (as TRL); DPOP does not apply (not a sigmoid).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


def hinge_loss(delta: Tensor, *, beta: float) -> Tensor:
    """``L = relu(1 - beta * delta)``, ``delta = c s_w - s_l``. Shapes: ``[b]`` -> ``[b]``."""
    return torch.relu(1.0 - beta * delta)


@register_loss("hinge", needs_reference=True, f_divergence=True)
def hinge_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """Hinge on a :class:`PairBatch`; log rho as DPO. Balance (where not flat): ``c``."""
    return difference_family(batch, config, partial(hinge_loss, beta=config.beta))
