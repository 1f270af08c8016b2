"""The one place that imports Megatron-Core.

Tested with megatron-core 0.16.1 (Python 3.11, CPU) and 0.19.x (Python 3.12, GPU; it needs
``triton``, which CUDA torch brings: a failed import names the fix). When an
import path or signature moves between releases, adapt it here and nowhere else. Public APIs
only; where Megatron has none for what the plugin needs, one documented function below wraps
the private one and a test pins its behaviour (``tests/unit/test_megatron_seam.py``).
"""

from __future__ import annotations

import inspect

import torch

from megatron_adadpo.platform.environment import megatron_import_error, te_available

try:
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
except ModuleNotFoundError as err:  # megatron-core itself, or a dependency it does not declare
    raise ImportError(megatron_import_error(err)) from err
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer as _get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.package_info import __version__ as MEGATRON_VERSION
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.utils import unwrap_model

__all__ = [
    "MEGATRON_VERSION",
    "AttnMaskType",
    "DType",
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "DotProductAttention",
    "GPTModel",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "OptimizerConfig",
    "OptimizerParamScheduler",
    "ProcessGroupCollection",
    "TransformerBlockSubmodules",
    "TransformerConfig",
    "dist_checkpointing",
    "finalize_model_grads",
    "get_forward_backward_func",
    "get_gpt_layer_local_spec",
    "get_megatron_optimizer",
    "get_num_layers_to_build",
    "llama3_rope_scaling",
    "megatron_rng_module",
    "parallel_state",
    "process_groups",
    "save_strategy",
    "te_layer_spec",
    "tensor_parallel",
    "unwrap_model",
    "vocab_parallel_cross_entropy",
]

_VPCE_TAKES_TP_GROUP = (
    "tp_group" in inspect.signature(tensor_parallel.vocab_parallel_cross_entropy).parameters
)


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, tp_group=None
) -> torch.Tensor:
    """Megatron's vocab-parallel CE. WARNING: mutates ``vocab_parallel_logits`` in place.

    ``tp_group`` is passed through where Megatron accepts one (0.19); releases without the
    argument (0.16) always reduce over ``parallel_state``'s TP group, so any other group raises
    instead of being silently replaced.

    Shapes: logits ``[s, b, v/tp]`` (fp32), target ``[s, b]`` -> per-token CE ``[s, b]`` fp32.
    """
    if _VPCE_TAKES_TP_GROUP and tp_group is not None:
        return tensor_parallel.vocab_parallel_cross_entropy(
            vocab_parallel_logits, target, tp_group=tp_group
        )
    if tp_group is not None and tp_group is not parallel_state.get_tensor_model_parallel_group(
        check_initialized=False
    ):
        raise ValueError(
            f"megatron-core {MEGATRON_VERSION}'s vocab_parallel_cross_entropy reduces over "
            "parallel_state's tensor-parallel group only; pass that group (or None)"
        )
    return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits, target)


def get_megatron_optimizer(config: OptimizerConfig, model_chunks: list, **kwargs):
    """Megatron's ``get_megatron_optimizer``; where it fell back to ``torch.optim.AdamW`` / ``Adam``
    (no Transformer Engine or apex), the inner optimizers run torch's fused kernel.

    Megatron constructs the fallback with torch's defaults and takes no implementation
    argument (0.16.1 and 0.19 ``optimizer/__init__.py``). Torch's default is the per-tensor
    for-loop on CPU (~20x slower than ``fused=True`` at 100M parameters) and ``foreach`` on CUDA;
    torch's fused AdamW (CPU and CUDA, torch >= 2.4) computes the same update. A
    ``load_state_dict`` post-hook keeps it after a checkpoint load, whose saved param groups
    would otherwise bring back the saved implementation flags.
    """
    optimizer = _get_megatron_optimizer(config, model_chunks, **kwargs)
    for inner in torch_optimizers(optimizer):
        if type(inner) in (torch.optim.AdamW, torch.optim.Adam):
            use_fast_adam(inner)
            inner.register_load_state_dict_post_hook(use_fast_adam)
    return optimizer


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained or not; none on a stub)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [
        p.optimizer
        for p in parts
        if isinstance(getattr(p, "optimizer", None), torch.optim.Optimizer)
    ]


FUSED_ADAM_DEVICES = ("cpu", "cuda")  # torch >= 2.4


def use_fast_adam(optimizer: torch.optim.Optimizer) -> None:
    """Switch a torch Adam(W) to its fused kernel (``foreach`` on other devices), in place.

    Each existing ``step`` moves to its parameter's device as fp32, one tensor per parameter,
    as torch keeps it for the fused kernel (Megatron's distributed optimizer restores one
    shared CPU ``step`` tensor for all parameters).
    """
    for group in optimizer.param_groups:
        fused = all(p.device.type in FUSED_ADAM_DEVICES for p in group["params"])
        group["fused"], group["foreach"] = fused, not fused
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state and fused:
                step = float(state["step"])
                state["step"] = torch.tensor(step, dtype=torch.float32, device=p.device)


def te_layer_spec(**kwargs):
    """``get_gpt_layer_with_transformer_engine_spec`` (raises a clear error without TE)."""
    if not te_available():
        raise RuntimeError(
            "Transformer Engine is not installed (or fails to import): the TE layer spec and FP8 "
            "need it. Install it on a CUDA machine: pip install 'megatron_adadpo[gpu]', or use "
            "execution.transformer_impl=local."
        )
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(**kwargs)


# GPTModel's public ``rope_scaling_factor`` keeps RotaryEmbedding._apply_scaling's other defaults.
_MEGATRON_ROPE_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_rope_scaling(
    gpt: GPTModel,
    rotary_base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> None:
    """Llama-3.1 RoPE frequency scaling with all four HF parameters, on a built ``GPTModel``.

    Build the model with ``rope_scaling=True, rope_scaling_factor=factor`` (public): that is
    exact when the other three parameters are Megatron's defaults (1, 4, 8192: every Llama 3.x
    release). Otherwise this recomputes ``inv_freq`` with ``RotaryEmbedding._apply_scaling``
    (private; no public argument exists for the other three), which implements HF's
    ``_compute_llama3_parameters``.
    """
    wanted = {
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "original_max_position_embeddings": original_max_position_embeddings,
    }
    if wanted == _MEGATRON_ROPE_DEFAULTS:
        return
    rope = gpt.rotary_pos_emb
    dim = rope.inv_freq.numel() * 2
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim
    rope.inv_freq = rope._apply_scaling(1.0 / (rotary_base**exponents), factor=factor, **wanted)


def save_strategy(thread_count: int) -> TorchDistSaveShardedStrategy:
    """``dist_checkpointing``'s default ``torch_dist`` save strategy with ``thread_count``
    writer threads per rank (the default strategy uses 2)."""
    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=thread_count)


def megatron_rng_module():
    """``megatron.core.tensor_parallel.random``, whose CUDA RNG helpers the CPU layer
    (``platform/cpu.py``) redirects: the one place outside this seam that patches Megatron."""
    from megatron.core.tensor_parallel import random

    return random


def process_groups() -> ProcessGroupCollection:
    """The TP / PP / CP / DP (and DP x CP) groups of the initialised parallel state, built once
    and passed to the step, log-prob and metric code."""
    return ProcessGroupCollection.use_mpu_process_groups(
        required_pgs=["tp", "pp", "cp", "dp", "dp_cp"]
    )
