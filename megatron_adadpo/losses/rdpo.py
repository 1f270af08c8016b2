"""R-DPO (length-regularised DPO) and its adaptive form.

R-DPO   L = -logsig(beta * (h_w - h_l) + alpha * (n_w - n_l))       arXiv 2403.19159
adapt.  L = -logsig(beta * (c * h_w - h_l) + alpha * (n_w - n_l))   arXiv 2605.28440

``alpha`` is ``loss.rdpo_alpha`` (this family's knob). f-divergences and DPOP enter the
difference as in ``dpo`` (the length term does not involve the reference, so ``log Z`` still
cancels).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor

from megatron_adadpo.losses.checks import finite_float
from megatron_adadpo.losses.common import FamilyOutput, PairBatch, difference_family, logistic_loss
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.config import LossConfig


@dataclass(frozen=True)
class RDPOKnobs:
    """``rdpo_alpha``: R-DPO's length coefficient (default 0.05, the low end of the grid
    {0.05, 0.1, 0.5, 1.0} that the SimPO paper searched for R-DPO)."""

    rdpo_alpha: float = 0.05

    def errors(self) -> list[str]:
        return finite_float("rdpo_alpha", self.rdpo_alpha)


def rdpo_loss(
    delta: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``L = -logsig(z)``, ``z = beta * delta + alpha * (n_w - n_l)``, ``delta = c h_w - h_l``.

    R-DPO (Park et al., https://arxiv.org/abs/2403.19159) in the form of ALGORITHM.md section 4
    (the SimPO paper's table of losses); ``c`` from AdaDPO (https://arxiv.org/abs/2605.28440).
    ``eps`` label smoothing as in DPO.

    Shapes: every input ``[b]`` per pair (lengths: completion token counts); returns ``[b]``.
    """
    z = beta * delta + alpha * (chosen_lengths - rejected_lengths)
    return logistic_loss(z, label_smoothing)


@register_loss(
    "rdpo",
    needs_reference=True,
    supports_label_smoothing=True,
    knobs=RDPOKnobs,
    f_divergence=True,
    dpop=True,
)
def rdpo_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """R-DPO on a :class:`PairBatch`; log rho as DPO. ``|dL/dl_w| / |dL/dl_l| = c``."""
    loss = partial(
        rdpo_loss,
        chosen_lengths=batch.chosen_lengths,
        rejected_lengths=batch.rejected_lengths,
        beta=config.beta,
        alpha=config.knobs.rdpo_alpha,
        label_smoothing=config.label_smoothing,
    )
    return difference_family(batch, config, loss)
