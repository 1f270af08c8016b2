"""DiscoPOP (TRL ``loss_type="discopop"``) and its adaptive form.

DiscoPOP  L = (1 - m) * (-logsig(z)) + m * exp(-z),  m = sig(z / tau),  z = beta (h_w - h_l)
                                                               arXiv 2406.08414 (Eq. 5)
adapt.    z = beta * (c * h_w - h_l)                           arXiv 2605.28440

``tau`` is ``loss.discopop_tau`` (this family's knob; the paper's and TRL's default 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_adadpo.losses.checks import positive
from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


@dataclass(frozen=True)
class DiscoPOPKnobs:
    """``discopop_tau``: the temperature of the log-ratio modulation (> 0; paper: 0.05)."""

    discopop_tau: float = 0.05

    def errors(self) -> list[str]:
        return positive("discopop_tau", self.discopop_tau)


def discopop_loss(delta: Tensor, *, beta: float, tau: float) -> Tensor:
    """``L = (1 - sig(z/tau)) (-logsig(z)) + sig(z/tau) exp(-z)``, ``z = beta * delta``.

    The exponential term is ``exp(logsig(z/tau) - z)``: finite where TRL's ``exp(-z) * m`` gives
    ``inf * 0`` (a very negative margin). Shapes: ``[b]`` -> ``[b]``.
    """
    z = beta * delta
    logistic = -F.logsigmoid(z) * torch.sigmoid(-z / tau)  # 1 - sig(x) = sig(-x)
    return logistic + torch.exp(F.logsigmoid(z / tau) - z)  # exp(-z) sig(z/tau), no inf * 0


@register_loss("discopop", needs_reference=True, knobs=DiscoPOPKnobs, f_divergence=True)
def discopop_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """DiscoPOP on a :class:`PairBatch`; log rho as DPO. ``|dL/dl_w| / |dL/dl_l| = c``."""
    loss = partial(discopop_loss, beta=config.beta, tau=config.knobs.discopop_tau)
    return difference_family(batch, config, loss)
