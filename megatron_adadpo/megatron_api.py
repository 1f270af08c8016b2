"""The one place that imports version-sensitive Megatron-Core symbols.

Tested with megatron-core 0.16.1 (Python 3.11, CPU) and 0.19.x (Python 3.12, GPU). When an
import path or signature moves between releases, adapt it here and nowhere else.
"""

from __future__ import annotations

import inspect

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: F401
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,  # noqa: F401
)
from megatron.core.models.gpt import GPTModel  # noqa: F401
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: F401
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: F401
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: F401
from megatron.core.package_info import __version__ as MEGATRON_VERSION  # noqa: F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401
from megatron.core.transformer import TransformerConfig  # noqa: F401
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: F401
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: F401

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "te_layer_spec",
    "vocab_parallel_cross_entropy",
]

_VPCE_TAKES_TP_GROUP = (
    "tp_group" in inspect.signature(tensor_parallel.vocab_parallel_cross_entropy).parameters
)


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, tp_group=None
) -> torch.Tensor:
    """Megatron's vocab-parallel CE. WARNING: mutates ``vocab_parallel_logits`` in place.

    Shapes: logits ``[s, b, v/tp]`` (fp32), target ``[s, b]`` -> per-token CE ``[s, b]`` fp32.
    """
    if _VPCE_TAKES_TP_GROUP and tp_group is not None:
        return tensor_parallel.vocab_parallel_cross_entropy(
            vocab_parallel_logits, target, tp_group=tp_group
        )
    return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits, target)


def te_available() -> bool:
    """True when Transformer Engine imports (it raises more than ImportError when broken)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def te_layer_spec(**kwargs):
    """``get_gpt_layer_with_transformer_engine_spec`` (raises a clear error without TE)."""
    if not te_available():
        raise RuntimeError(
            "Transformer Engine is not installed (or fails to import): the TE layer spec and FP8 "
            "need it. Install it on a CUDA machine: pip install 'megatron_adadpo[gpu]', or use "
            "model.transformer_impl=local."
        )
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(**kwargs)
