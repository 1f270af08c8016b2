"""AOT, unpaired (TRL ``loss_type="aot_unpaired"``); no adaptive form.

AOT-unpaired  delta_(k) = sort(h_w)_(k) - sort(h_l)_(k)                 arXiv 2406.05882
              L_(k) = -(1-eps) logsig(beta delta_(k)) - eps logsig(-beta delta_(k))

Sorted across the pairs of one micro-batch, as ``aot`` (its docstring: batch dependence,
invalid pairs, why the coefficient and WPO are refused). The k-th loss is reported on the pair
holding the k-th smallest ``h_w``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_adadpo.losses.aot import SORTED_FAMILY, sorted_family_output
from megatron_adadpo.losses.registry import register_loss

if TYPE_CHECKING:
    from megatron_adadpo.losses.common import FamilyOutput, PairBatch
    from megatron_adadpo.losses.config import LossConfig


@register_loss("aot_unpaired", **SORTED_FAMILY)
def aot_unpaired_family(batch: PairBatch, config: LossConfig) -> FamilyOutput:
    """AOT-unpaired on a :class:`PairBatch`: sorted ``h_w`` minus sorted ``h_l``."""
    h_w, h_l = batch.chosen_logratios, batch.rejected_logratios
    return sorted_family_output(h_w, h_l, batch, config)
