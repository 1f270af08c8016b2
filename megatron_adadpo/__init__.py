"""megatron_adadpo: AdaDPO and the DPO family as a Megatron-Core plugin.

Public API (imported on first use, so that light modules such as ``megatron_adadpo.config``
stay light):

    load_config, Config            the run configuration (YAML + ``--set`` overrides)
    Trainer                        one training run inside an initialised process group
    open_run                       a config's run: its Trainer, or the finished run (train.py)
    LossConfig, preference_loss    the loss library (pure tensor functions)
    ModelConfig, ExecutionConfig   the model and how it runs (layout, precision, kernels)
    DataConfig                     the preference data pipeline's settings
    convert_hf_to_megatron, convert_megatron_to_hf   checkpoint conversion

Entry points: ``python -m megatron_adadpo.train`` (torchrun) and the scripts in ``tools/``.
"""

from __future__ import annotations

from megatron_adadpo.lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "Config": "megatron_adadpo.config",
    "load_config": "megatron_adadpo.config",
    "Trainer": "megatron_adadpo.run.trainer",
    "open_run": "megatron_adadpo.run.trainer",
    "LossConfig": "megatron_adadpo.losses",
    "preference_loss": "megatron_adadpo.losses",
    "ModelConfig": "megatron_adadpo.model.config",
    "ExecutionConfig": "megatron_adadpo.layout",
    "DataConfig": "megatron_adadpo.data.config",
    "convert_hf_to_megatron": "megatron_adadpo.convert",
    "convert_megatron_to_hf": "megatron_adadpo.convert",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
