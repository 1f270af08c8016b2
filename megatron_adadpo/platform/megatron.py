"""The one place that imports Megatron-Core (with its two siblings: ``megatron_optimizer.py``
for the optimizer, ``safe_dcp.py`` for loading checkpoints without running their code).

Tested with megatron-core 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12; it needs ``triton``,
which CUDA torch brings: a failed import names the fix), both in CI on CPU. When an
import path or signature moves between releases, adapt it here and nowhere else. Public APIs
only; where Megatron has none for what the plugin needs, one documented function below wraps
the private one and a test pins its behaviour (``tests/unit/test_megatron_seam.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch

from megatron_adadpo.platform.environment import megatron_import_error, te_available

try:
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
except ModuleNotFoundError as err:  # megatron-core itself, or a dependency it does not declare
    raise ImportError(megatron_import_error(err)) from err
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.package_info import __version__ as MEGATRON_VERSION
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.utils import (
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_batch_on_this_cp_rank as _get_batch_on_this_cp_rank
from megatron.core.utils import unwrap_model

__all__ = [
    "ASYNC_SAVE_ARGUMENTS",
    "MEGATRON_VERSION",
    "AsyncCallsQueue",
    "AttnMaskType",
    "apply_swiglu_sharded_factory",
    "DType",
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "DotProductAttention",
    "GPTModel",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "OptimizerParamScheduler",
    "PACKED_SEQ_TAKES_PAD_FLAG",
    "PackedSeqParams",
    "ProcessGroupCollection",
    "StaticInferenceContext",
    "TransformerBlockSubmodules",
    "TransformerConfig",
    "dist_checkpointing",
    "final_hidden_states",
    "finalize_model_grads",
    "fully_parallel_save_strategy",
    "get_batch_on_this_cp_rank",
    "get_forward_backward_func",
    "get_gpt_layer_local_spec",
    "get_num_layers_to_build",
    "inference_mode",
    "llama3_rope_scaling",
    "make_sharded_tensors_for_checkpoint",
    "megatron_rng_module",
    "output_layer_weight",
    "parallel_state",
    "process_groups",
    "replace_prefix_for_sharding",
    "save_strategy",
    "sharded_state_dict_default",
    "te_layer_spec",
    "te_spec_provider",
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


_CP_SPLIT_TAKES_HYBRID = "is_hybrid_cp" in inspect.signature(_get_batch_on_this_cp_rank).parameters


def get_batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """Megatron's load-balanced context-parallel split of ``[b, s]`` tensors (no ``cu_seqlens``
    in ``batch``): the sequence is cut into ``2 cp`` chunks and CP rank ``r`` keeps chunks ``r``
    and ``2 cp - 1 - r``. 0.16 takes ``(batch, cp_group=)``; 0.19 adds ``is_hybrid_cp``
    (positional), False here, which without ``cu_seqlens`` is the same per-sequence zigzag.
    The reference the project's own splitter (``run/context_parallel.py``) is tested against.
    """
    if _CP_SPLIT_TAKES_HYBRID:
        return _get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
    return _get_batch_on_this_cp_rank(batch, cp_group=cp_group)


# 0.19 lets the caller say whether a packed row has padding (``packed_seq_params.py`` line 28,
# forwarded to TE >= 2.2 by ``extensions/transformer_engine.py`` line 1944); 0.16.1 has no such
# field, and Transformer Engine infers it (``run/microbatch.thd_params``).
PACKED_SEQ_TAKES_PAD_FLAG = "pad_between_seqs" in {
    f.name for f in dataclasses.fields(PackedSeqParams)
}

try:  # 0.19: inference behaviour follows a process-wide flag, not the inference context
    from megatron.core.inference.utils import InferenceMode as _InferenceMode
except ImportError:  # 0.16.1
    _InferenceMode = None


def inference_mode() -> contextlib.AbstractContextManager:
    """The mode in which ``GPTModel`` given an ``inference_context`` computes the logits of the
    last position only (``StaticInferenceContext`` asks for them:
    ``materialize_only_last_token_logits``). 0.19.2 checks ``InferenceMode.is_active()``
    (``models/gpt/gpt_model.py`` lines 648 and 739-745); 0.16.1 enters it whenever a context is
    passed to a model in eval mode (``models/gpt/gpt_model.py`` lines 584 and 664)."""
    if _InferenceMode is None:
        return contextlib.nullcontext()
    return _InferenceMode.active()


_GPT_TAKES_OUTPUT_PROCESSOR = "output_processor" in inspect.signature(GPTModel.forward).parameters


def _hidden_states_only(*, hidden_states: torch.Tensor, **_unused) -> torch.Tensor:
    """A ``GPTModel`` ``output_processor`` that returns the decoder's output unchanged."""
    return hidden_states


def final_hidden_states(
    model, input_ids, position_ids, attention_mask, **forward_kwargs
) -> torch.Tensor:
    """Run a (DDP-wrapped) ``GPTModel`` chunk without its output layer.

    On the last pipeline stage: the decoder's output after the final norm, ``[s, b, h]``
    (``[s/tp, b, h]`` with sequence parallelism), i.e. the output layer's input; elsewhere the
    chunk's ordinary output (hidden states for the next stage). ``forward_kwargs`` go to
    ``GPTModel.forward`` (e.g. ``packed_seq_params``).

    megatron-core >= 0.18: ``GPTModel.forward``'s public ``output_processor`` hook receives
    these hidden states in place of the output layer. 0.16 / 0.17 have no hook: the model's
    ``post_process`` attribute is switched off for the call, so ``_postprocess`` returns the
    hidden states before the output layer (the decoder's final norm belongs to the decoder and
    still runs). Pinned by ``tests/unit/test_megatron_seam.py``. The skipped output layer's
    forward pre-hooks still run (``run_forward_pre_hooks``: DDP's parameter all-gather wait).
    """
    gpt = unwrap_model(model)
    if _GPT_TAKES_OUTPUT_PROCESSOR:
        hidden = model(
            input_ids,
            position_ids,
            attention_mask,
            output_processor=_hidden_states_only,
            **forward_kwargs,
        )
    elif not gpt.post_process:
        return model(input_ids, position_ids, attention_mask, **forward_kwargs)
    else:
        gpt.post_process = False
        try:
            hidden = model(input_ids, position_ids, attention_mask, **forward_kwargs)
        finally:
            gpt.post_process = True
    if gpt.post_process:
        run_forward_pre_hooks(gpt.output_layer)
    return hidden


def run_forward_pre_hooks(module: torch.nn.Module) -> None:
    """Run ``module``'s forward pre-hooks without its forward (the caller uses its weights).

    Megatron DDP waits for a bucket's overlapped parameter all-gather only in the forward
    pre-hook of a module owning one of its parameters (``_make_forward_pre_hook``); one never
    waited for fails the next step's ``assert self.param_gather_handle is None``. Megatron does
    the same for modules its fused paths skip (``transformer/cuda_graphs.py``
    ``call_ddp_preforward_hook``): hooks get no input and must return None.
    """
    for hook in list(module._forward_pre_hooks.values()):
        if hook(module, ()) is not None:
            raise RuntimeError(f"a forward pre-hook of {type(module).__name__} changes its input")


def output_layer_weight(model) -> tuple[torch.Tensor, bool] | None:
    """``(weight [v/tp, h], sequence_parallel)`` of a ``GPTModel`` chunk's output layer, or
    None off the last pipeline stage.

    The weight is the one ``GPTModel`` multiplies by: the shared embedding weight with tied
    embeddings (``shared_embedding_or_output_weight``), else ``output_layer.weight``.
    ``sequence_parallel`` is the output layer's own flag: it all-gathers its input over TP.
    Refuses output layers the chunked log-prob path does not reproduce (a bias, a gathered
    output, Transformer Engine's MXFP8 LM head, MuP logit scaling).
    """
    gpt = unwrap_model(model)
    if not gpt.post_process:
        return None
    layer = gpt.output_layer
    unsupported = (
        not isinstance(layer, tensor_parallel.ColumnParallelLinear)
        or layer.bias is not None
        or layer.gather_output
        or getattr(gpt.config, "use_mup", False)
    )
    if unsupported:
        raise ValueError(
            f"execution.logprob_chunk_tokens needs the plain vocab-parallel output layer "
            f"(ColumnParallelLinear, no bias, parallel output, no MuP); got {type(layer).__name__}"
            "; set execution.logprob_chunk_tokens=0"
        )
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight(), layer.sequence_parallel
    return layer.weight, layer.sequence_parallel


def _require_te() -> None:
    """Raises a clear error where Transformer Engine does not import."""
    if not te_available():
        raise RuntimeError(
            "Transformer Engine is not installed (or fails to import): the TE layer spec and FP8 "
            "need it. Install it on a CUDA machine: pip install 'megatron_adadpo[gpu]', or use "
            "execution.transformer_impl=local."
        )


def te_layer_spec(**kwargs):
    """``get_gpt_layer_with_transformer_engine_spec`` (raises a clear error without TE)."""
    _require_te()
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(**kwargs)


def te_spec_provider():
    """Megatron's ``TESpecProvider`` (the TE spec's modules: ``layer_norm()`` is ``TENorm``,
    ``column_parallel_linear()`` ``TEColumnParallelLinear``; megatron-core 0.16.1 and 0.19.2
    ``extensions/transformer_engine_spec_provider.py``); needs TE (``te_layer_spec``)."""
    _require_te()
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


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


def fully_parallel_save_strategy(group) -> FullyParallelSaveStrategyWrapper:
    """The default ``torch_dist`` save strategy inside Megatron's
    ``FullyParallelSaveStrategyWrapper`` over ``group`` (Megatron-LM's
    ``--ckpt-fully-parallel-save``, default on, over the DP x CP group: megatron/training/
    checkpointing.py). Each tensor replicated across ``group`` is written by one of its ranks,
    chosen to even out the bytes per rank, instead of by the rank with replica id 0 (DP rank 0)
    (megatron-core 0.16.1 / 0.19 ``strategies/fully_parallel.py``:
    ``determine_main_replica_uniform_distribution``)."""
    return FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1), group)


# ``dist_checkpointing.save(..., async_sharded_save=True)`` arguments naming Megatron's own async
# writer, the one ``AsyncCallsQueue`` runs. 0.19 defaults to ``async_strategy="nvrx"``
# (nvidia-resiliency-ext, not a dependency: serialization.py ``save``, strategies/torch.py
# ``get_async_strategy``); 0.16.1 has only Megatron's and no such argument.
ASYNC_SAVE_ARGUMENTS = (
    {"async_strategy": "mcore"}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters
    else {}
)


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
