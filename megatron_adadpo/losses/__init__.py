"""Preference losses: AdaDPO (arXiv 2605.28440) and the DPO family.

Pure tensor functions (no Megatron import, no host syncs). One file per loss family, each
registered in :data:`LOSSES`; the balancing coefficient shared by all of them lives in
:mod:`megatron_adadpo.losses.adaptive`. Names are imported on first use, so that
``megatron_adadpo.losses.config`` (and the run config that uses it) imports no torch.
"""

from __future__ import annotations

from megatron_adadpo.lazy import lazy_exports

_EXPORTS = {
    "Coefficients": ".adaptive",
    "balancing_coefficients": ".adaptive",
    "LossConfig": ".config",
    "EXTREMA_METRIC_NAMES": ".metrics",
    "METRIC_NAMES": ".metrics",
    "accumulate_metrics": ".metrics",
    "all_reduce_metrics": ".metrics",
    "reduce_metrics": ".metrics",
    "reduce_op": ".metrics",
    "stack_metrics": ".metrics",
    "token_mean_metric": ".metrics",
    "unstack_metrics": ".metrics",
    "preference_loss": ".preference",
    "LOSSES": ".registry",
    "LossFamily": ".registry",
    "register_loss": ".registry",
}

__all__ = sorted(_EXPORTS)


def _register_families(module) -> None:
    if module.__name__.endswith(".registry"):
        module.load_families()  # LOSSES is complete once every family module is imported


__getattr__ = lazy_exports(__name__, _EXPORTS, on_import=_register_families)
