"""Build Megatron-Core ``GPTModel`` chunks for a Llama-family ``ModelConfig``.

Transformer Engine layer spec on GPUs when TE is installed (FP8 through TE's recipes); the local
spec otherwise, with the plugin's ``RMSNorm`` (``model/norm.py``: unlike ``WrappedTorchNorm`` it
supports sequence parallelism). Pipelines run with ``variable_seq_lengths`` (each micro-batch
has its own length; Megatron exchanges shapes before each p2p transfer), except on packed rows,
which all have their step's longest row's length (fixed shapes, no exchange). For packed sequences
on the local spec the attention's mask type is ``arbitrary``: the block-diagonal mask passed to
``GPTModel`` is then the whole mask (with ``causal``, Megatron's fused softmax kernel builds its
own causal mask and ignores a passed one).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.attention import core_attention_module, with_core_attention
from megatron_adadpo.model.config import ModelConfig
from megatron_adadpo.model.lora_spec import split_norm_spec
from megatron_adadpo.model.norm import RMSNorm
from megatron_adadpo.platform.machine import probe_machine, torch_device
from megatron_adadpo.platform.megatron import (
    AttnMaskType,
    GPTModel,
    TransformerBlockSubmodules,
    TransformerConfig,
    get_gpt_layer_local_spec,
    get_num_layers_to_build,
    llama3_rope_scaling,
    parallel_state,
    te_layer_spec,
    te_spec_provider,
)
from megatron_adadpo.resolve.kernels import Kernels, resolve_kernels


def kernels_of(run: ExecutionConfig, kernels: Kernels | None) -> Kernels:
    """The resolved kernels (``ResolvedRun.kernels``); None: ``run``'s on this machine."""
    return kernels if kernels is not None else resolve_kernels(run, probe_machine())


def transformer_config(
    model: ModelConfig,
    run: ExecutionConfig,
    kernels: Kernels | None = None,
    packed_sequences: bool = False,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for the Llama family under the given execution options
    and resolved ``kernels`` (None: resolved on this machine); ``packed_sequences``: the run
    feeds packed rows (fixed pipeline shapes, ``_p2p_options``)."""
    kernels = kernels_of(run, kernels)
    on_gpu = kernels.cuda
    dtype = torch.bfloat16 if run.bf16 else torch.float32
    recompute = {}
    if run.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif run.recompute == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=run.recompute_num_layers,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=run.tp,
        pipeline_model_parallel_size=run.pp,
        virtual_pipeline_model_parallel_size=run.vpp,
        context_parallel_size=run.cp,
        sequence_parallel=run.sequence_parallel,
        params_dtype=dtype,
        bf16=run.bf16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        **_p2p_options(run, on_gpu, fixed_shapes=packed_sequences),
        # No MoE here; TransformerConfig refuses variable_seq_lengths with the default
        # "allgather" MoE dispatcher (0.16.1 __post_init__), whether or not experts exist.
        moe_token_dispatcher_type="alltoall",
        calculate_per_token_loss=True,
        **kernel_fusions(kernels),
        **recompute,
        **fp8_options(run),
    )


def _p2p_options(run: ExecutionConfig, on_gpu: bool, fixed_shapes: bool) -> dict:
    """Pipeline p2p settings: the micro-batch shapes, fixed or exchanged before each transfer.

    ``variable_seq_lengths``: each micro-batch keeps its own length, and every p2p send is
    preceded by a blocking shape exchange (megatron-core 0.16.1
    ``pipeline_parallel/p2p_communication.py`` ``_communicate``: ``_communicate_shapes`` when
    ``config.variable_seq_lengths``, whose gloo/NCCL path ends in ``torch.cuda.synchronize()``).
    ``fixed_shapes`` (packed rows, all the token budget long: ``data/batching.py``
    ``row_tokens``) turns it off: the schedule then sizes every buffer from its ``seq_length``
    and ``micro_batch_size`` (``schedules.get_tensor_shapes``). Unpacked token-budget
    micro-batches keep it: their row count and length both vary, and padding them to one shape
    would cost more compute than the exchange costs time. The interleaved schedule overlaps its
    p2p (``overlap_p2p_comm``, Megatron-LM's default with virtual stages), so no call sends two
    tensors to one peer: with ``batch_p2p_comm`` at PP = 2 (next == prev rank) the shape
    exchange pairs the forward and backward shapes crosswise (Megatron-LM #1450 / #5100).
    Without virtual stages, batched p2p on GPUs; on gloo batched interleaved p2p is silently
    wrong (Megatron-LM #750).
    """
    if run.pp == 1:
        return {}
    interleaved = run.vpp is not None
    return dict(
        variable_seq_lengths=not fixed_shapes,
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=on_gpu and not interleaved,
    )


def kernel_fusions(kernels: Kernels) -> dict:
    """Megatron's fused kernels as resolved (``resolve/kernels.fusions``: Megatron-LM's
    defaults where the machine has them).

    All off on CPU (``execution.fusions: false`` also turns them off): there Megatron would
    route them through ``torch.compile`` or raise. On a GPU:

    - ``bias_activation_fusion``: SwiGLU as one jit-fused op that saves only its input for
      backward (``fusions/fused_bias_swiglu.py``); unfused, autograd also keeps ``silu(gate)``
      (``[s, b, ffn/tp]`` per layer, which the planner counts);
    - ``bias_dropout_fusion``: the fused residual bias-dropout-add;
    - ``apply_rope_fusion``: Transformer Engine's fused RoPE (Megatron requires TE for it);
    - ``masked_softmax_fusion``: the local spec's fused softmax, when its extension is built;
    - ``gradient_accumulation_fusion``: weight-gradient GEMMs accumulate straight into DDP's
      fp32 ``main_grad``; Megatron's own linear layers (the output layer, also under the TE
      spec) need apex's ``fused_weight_gradient_mlp_cuda`` for it and raise without it.

    ``persist_layer_norm`` stays off (apex LayerNorm only; Llama uses RMSNorm) and
    ``cross_entropy_loss_fusion`` too (the plugin computes its own log-probs).
    """
    fused = {f"{name}_fusion": on for name, on in dataclasses.asdict(kernels.fusions).items()}
    return fused | dict(persist_layer_norm=False, cross_entropy_loss_fusion=False)


def fp8_options(run: ExecutionConfig) -> dict:
    """FP8 format, recipe and delayed-scaling options (Megatron builds TE's recipe from them:
    ``fp8_utils.get_fp8_recipe``); ``{}`` without FP8."""
    if not run.fp8:
        return {}
    return dict(
        fp8=run.fp8,
        fp8_recipe=run.fp8_recipe,
        fp8_amax_history_len=run.fp8_amax_history_len,
        fp8_amax_compute_algo=run.fp8_amax_compute_algo,
        fp8_margin=run.fp8_margin,
    )


def layer_spec(
    config: TransformerConfig,
    run: ExecutionConfig,
    vp_stage: int | None,
    packed_sequences: bool = False,
    kernels: Kernels | None = None,
):
    """The decoder block spec for this pipeline stage (TE spec, or local spec + RMSNorm), with
    the resolved core attention (``kernels.attention``, ``model/attention.py``); on the TE
    spec the linears LoRA targets are built apart from their norm (``model/lora_spec.py``).

    ``packed_sequences`` (local spec): attention mask type ``arbitrary``, so the block-diagonal
    mask of a packed row (``data/packing.py``) is applied as given. TE takes packed rows through
    ``PackedSeqParams`` (THD) with its causal spec.
    """
    kernels = kernels_of(run, kernels)
    attention = core_attention_module(kernels.attention)
    if kernels.transformer_engine:
        spec = te_layer_spec(qk_layernorm=False)
        if kernels.split_norm_linears:  # LoRA targets a fused norm + linear
            spec = split_norm_spec(spec, kernels.split_norm_linears, te_spec_provider())
        return with_core_attention(spec, attention)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules = dataclasses.replace(
        spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm
    )
    spec = with_core_attention(spec, attention)
    if packed_sequences:
        spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    n_local = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n_local, layer_norm=RMSNorm)


def build_model(
    model: ModelConfig,
    run: ExecutionConfig,
    packed_sequences: bool = False,
    kernels: Kernels | None = None,
) -> list[GPTModel]:
    """One ``GPTModel`` per virtual pipeline stage of this rank (a list of one without VPP).

    Parallel state must be initialised for ``run``'s layout. Weights are on the resolved
    device in ``params_dtype``; wrap them in Megatron DDP before training. ``packed_sequences``:
    the run feeds packed rows (``data.batching: packed``), see ``layer_spec``. ``kernels``:
    the resolved run's (None: ``run``'s on this machine).
    """
    kernels = kernels_of(run, kernels)
    config = transformer_config(model, run, kernels, packed_sequences)
    chunks = []
    for vp_stage in range(run.vpp or 1):
        stage = vp_stage if run.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        gpt = gpt_model(model, config, run, pre, post, stage, packed_sequences, kernels)
        if kernels.cuda:
            gpt.cuda(torch_device("cuda"))
        chunks.append(gpt)
    return chunks


def gpt_model(
    model: ModelConfig,
    config: TransformerConfig,
    run: ExecutionConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    packed_sequences: bool = False,
    kernels: Kernels | None = None,
) -> GPTModel:
    """One Llama-family ``GPTModel`` chunk (RoPE, untied or tied embeddings, TP-padded vocab)."""
    spec = layer_spec(config, run, vp_stage, packed_sequences, kernels)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size(run.tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=model.rope_scaling is not None,
        rope_scaling_factor=model.rope_scaling.factor if model.rope_scaling else 8.0,
        vp_stage=vp_stage,
    )
    if model.rope_scaling is not None:
        llama3_rope_scaling(gpt, model.rotary_base, **dataclasses.asdict(model.rope_scaling))
    return gpt
