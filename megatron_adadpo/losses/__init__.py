"""Preference losses: AdaDPO (arXiv 2605.28440) and the DPO family.

Pure tensor functions (no Megatron import, no host syncs). One file per loss family, each
registered in :data:`LOSSES`; the balancing coefficient shared by all of them lives in
:mod:`megatron_adadpo.losses.adaptive`.
"""

from megatron_adadpo.losses import cpo, dpo, ipo, orpo, rdpo, simpo  # noqa: F401 (register)
from megatron_adadpo.losses.adaptive import Coefficients, balancing_coefficients
from megatron_adadpo.losses.config import LossConfig
from megatron_adadpo.losses.metrics import (
    EXTREMA_METRIC_NAMES,
    METRIC_NAMES,
    accumulate_metrics,
    all_reduce_metrics,
    reduce_metrics,
    reduce_op,
    stack_metrics,
    unstack_metrics,
)
from megatron_adadpo.losses.preference import preference_loss
from megatron_adadpo.losses.registry import LOSSES, LossFamily, register_loss

__all__ = [
    "EXTREMA_METRIC_NAMES",
    "LOSSES",
    "METRIC_NAMES",
    "Coefficients",
    "LossConfig",
    "LossFamily",
    "accumulate_metrics",
    "all_reduce_metrics",
    "balancing_coefficients",
    "preference_loss",
    "reduce_metrics",
    "reduce_op",
    "register_loss",
    "stack_metrics",
    "unstack_metrics",
]
