"""IPO (length-normalised) and its adaptive form (TRL ``loss_type="ipo"``).

IPO     L = (h_w/n_w - h_l/n_l - 1/(2 tau))^2          arXiv 2310.12036
adapt.  L = (c * h_w/n_w - h_l/n_l - 1/(2 tau))^2      arXiv 2605.28440

tau is ``loss.ipo_tau`` (this family's knob), or ``loss.beta`` when ``ipo_tau`` is None (TRL's
``loss_type="ipo"`` convention, where ``beta`` is the paper's tau). With ``f_divergence_type``
``h`` becomes the f-divergence score (as TRL).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor

from megatron_adadpo.losses.checks import positive
from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


@dataclass(frozen=True)
class IPOKnobs:
    """``ipo_tau``: IPO's tau (> 0; target margin ``1 / (2 tau)``), or None to use ``beta``
    (TRL's convention); with ``ipo_tau`` set, ``beta`` only scales the logged rewards."""

    ipo_tau: float | None = None

    def errors(self) -> list[str]:
        if self.ipo_tau is None:
            return []
        return positive("ipo_tau", self.ipo_tau, "a float > 0, or None to use beta as tau")

    def notices(self, config: LossConfig) -> list[str]:
        if self.ipo_tau is not None or config.beta == 0.1:
            return []
        return [
            f"loss.ipo_tau unset: IPO uses tau = beta = {config.beta} (TRL's convention); "
            "configs written when ipo_tau defaulted to 0.1 used tau = 0.1. Set loss.ipo_tau "
            "to choose tau apart from beta (then beta only scales the logged rewards)"
        ]


def ipo_loss(delta: Tensor, *, tau: float) -> Tensor:
    """``L = (delta - 1 / (2 tau))^2``, ``delta = a * h_w/n_w - b * h_l/n_l``.

    IPO (Azar et al., https://arxiv.org/abs/2310.12036), length-normalised as in common
    practice (ALGORITHM.md section 4); ``a / b = c`` from AdaDPO
    (https://arxiv.org/abs/2605.28440).

    Shapes: delta ``[b]`` per pair (difference of per-token mean log-ratios); returns ``[b]``.
    """
    return (delta - 0.5 / tau) ** 2


def ipo_tau(config: LossConfig) -> float:
    """IPO's tau: ``loss.ipo_tau``, or ``loss.beta`` when it is None (TRL's convention)."""
    return config.beta if config.knobs.ipo_tau is None else config.knobs.ipo_tau


@register_loss("ipo", needs_reference=True, knobs=IPOKnobs, f_divergence=True)
def ipo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """IPO on a :class:`PairBatch`; log rho as DPO; tau = :func:`ipo_tau`.

    ``|dL/dl_w| / |dL/dl_l| = (a / n_w) / (b / n_l) = c * n_l / n_w``. Rewards: ``beta * h``.
    """
    return difference_family(batch, config, partial(ipo_loss, tau=ipo_tau(config)), per_token=True)
