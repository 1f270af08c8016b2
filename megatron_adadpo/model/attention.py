"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

``softmax(q k^T * scale + mask) v`` with torch's fused kernels (flash / memory-efficient on CUDA,
the flash CPU kernel on CPU), instead of Megatron's ``DotProductAttention``, which materialises
the ``[b, np, s, s]`` scores and their softmax. It subclasses ``DotProductAttention`` and keeps
its constructor (``config, layer_number, attn_mask_type, attention_type, attention_dropout,
softmax_scale, cp_comm_type, pg_collection``: the same in megatron-core 0.16.1 and 0.19) and
its ``forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
packed_seq_params)``, so it plugs into any layer spec's ``self_attention`` as
``core_attention`` (``with_core_attention``). What SDPA cannot express (a softmax offset, sliding
windows, attention bias, THD packed sequences) goes to Megatron's own forward unchanged.

Masks (the interface packed rows use):

- ``attention_mask=None`` with a causal ``attn_mask_type`` (the Llama case): the pure causal fast
  path, ``is_causal=True`` and no mask tensor.
- ``attention_mask`` given: Megatron's convention, a **bool** tensor where ``True`` = masked out,
  broadcastable to ``[b, 1, sq, sk]`` (e.g. a block-diagonal causal mask for rows packed with
  several sequences, passed through ``GPTModel.forward(attention_mask=...)``). With a causal
  ``attn_mask_type`` it is combined with causality (a position is attended only when both allow
  it); unlike Megatron's unfused softmax, which then uses the given mask alone. A query row that
  every key masks returns zeros (torch's safe softmax) where Megatron returns the mean of ``v``;
  such rows are padding and carry no loss.

GQA: with ``ng < np`` query groups, ``enable_gqa=True`` (torch >= 2.5) lets the kernel share
K/V across the heads of a group without copies: always on CPU, and on CUDA without a mask (the
flash kernel). With a mask on CUDA, flash is out and the memory-efficient kernel accepts
``enable_gqa`` only in recent torch releases (never on ROCm; torch's ``sdp_utils.cpp``), so K/V
are repeated there instead of risking the ``[b, np, s, s]`` math fallback.

Shapes: ``query [sq, b, np, hn]``, ``key / value [sk, b, ng, hn]`` -> ``[sq, b, np * hn]``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from megatron_adadpo.platform.megatron import AttnMaskType, DotProductAttention, tensor_parallel

TORCH_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` whose forward runs torch's fused scaled-dot-product attention.

    Same scale (``softmax_scale``, default ``1/sqrt(hn)``, layer scaling folded back in), same
    attention dropout (``config.attention_dropout``, drawn from Megatron's model-parallel RNG
    tracker without sequence parallelism, as Megatron does), same output layout.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Megatron divides softmax_scale by the layer number and multiplies it back in the fp32
        # softmax (apply_query_key_layer_scaling); SDPA takes the product.
        layer_scaling = self.layer_number if self.config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * layer_scaling

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if not self._sdpa_can_run(query, key, causal, attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        allowed = _allowed_positions(attention_mask, causal, query.size(0), key.size(0))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        gqa = q.size(1) != k.size(1)
        native_gqa = gqa and native_gqa_allowed(allowed is not None, q.device.type)
        if gqa and not native_gqa:
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0
        kwargs = dict(enable_gqa=True) if native_gqa else {}
        with self._dropout_rng(dropout):
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout,
                is_causal=causal and allowed is None,
                scale=self.sdpa_scale,
                **kwargs,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)

    def _sdpa_can_run(self, query, key, causal, attention_bias, packed_seq_params) -> bool:
        """False for what only Megatron's forward implements (or refuses with its own error)."""
        return (
            self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
            and attention_bias is None
            and packed_seq_params is None
            and not (causal and query.size(0) != key.size(0))
        )

    def _dropout_rng(self, dropout: float):
        """Megatron's model-parallel RNG for attention dropout (heads differ per TP rank); no
        RNG switch at all without dropout."""
        if dropout > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def native_gqa_allowed(masked: bool, device_type: str) -> bool:
    """Whether SDPA gets ``enable_gqa=True`` (else K/V are repeated per head): torch >= 2.5,
    and on CUDA only without a mask (see the module docstring)."""
    return TORCH_HAS_ENABLE_GQA and not (masked and device_type == "cuda")


def _allowed_positions(
    attention_mask: torch.Tensor | None, causal: bool, sq: int, sk: int
) -> torch.Tensor | None:
    """SDPA's bool ``attn_mask`` (True = attend) from Megatron's (True = masked out), combined
    with causality; None for the pure causal / unmasked fast path.

    Shapes: ``attention_mask`` broadcastable to ``[b, 1, sq, sk]`` -> the same shape.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise TypeError(
            f"attention_mask must be a bool tensor with True = masked out (Megatron's convention), "
            f"got {attention_mask.dtype}"
        )
    allowed = ~attention_mask
    if causal:
        lower = torch.ones(sq, sk, dtype=torch.bool, device=allowed.device).tril()
        allowed = allowed & lower
    return allowed


def core_attention_module(attention: str):
    """The ``core_attention`` class for a resolved ``execution.attention``
    (``resolve/kernels.attention_impl``): None keeps the layer spec's own (TE's)."""
    return {"sdpa": SDPAttention, "megatron_local": DotProductAttention}.get(attention)


def with_core_attention(layer_spec, core_attention):
    """A copy of a transformer-layer ``ModuleSpec`` whose self-attention uses ``core_attention``
    (a class with ``DotProductAttention``'s constructor); ``None`` keeps the spec's own."""
    if core_attention is None:
        return layer_spec
    attention = layer_spec.submodules.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, core_attention=core_attention),
    )
    return dataclasses.replace(
        layer_spec,
        submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention),
    )
