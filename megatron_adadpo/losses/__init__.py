"""Preference losses: AdaDPO (arXiv 2605.28440) and the DPO family.

Pure tensor functions (no Megatron import, no host syncs). One file per loss family (TRL's
``loss_type`` name where TRL has it), each registered in :data:`LOSSES` with its own knobs; the
balancing coefficient shared by all of them lives in :mod:`megatron_adadpo.losses.adaptive`,
the options every family composes with (SFT term, WPO weights) in ``preference.py``, the
f-divergence scores in ``divergence.py``. Per-pair metrics only: their reduction across
micro-batches and ranks is :mod:`megatron_adadpo.run.metrics`. Names are imported on first use,
so that ``megatron_adadpo.losses.config`` (and the run config that uses it) imports no torch.
"""

from __future__ import annotations

from megatron_adadpo.lazy import lazy_exports

_EXPORTS = {
    "Coefficients": ".adaptive",
    "balancing_coefficients": ".adaptive",
    "LossConfig": ".config",
    "EXTREMA_METRIC_NAMES": ".metrics",
    "METRIC_NAMES": ".metrics",
    "token_mean_metric": ".metrics",
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
