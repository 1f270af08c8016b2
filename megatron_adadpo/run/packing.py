"""How a packed row reaches Megatron's attention (``data/packing.py`` lays the row out;
``MicroBatch.attention_inputs`` in ``run/microbatch.py`` builds the inputs).

- Transformer Engine attention: ``PackedSeqParams(qkv_format="thd")`` from the row's
  ``cu_seqlens`` / ``cu_seqlens_padded`` / ``max_seqlen`` (``run/microbatch.thd_params``); whether
  the row has padding is said, never left to TE to infer.
- Any other core attention: ``GPTModel``'s ``attention_mask`` argument, the block-diagonal
  causal mask built on the device from ``segment_ids``.
"""

from __future__ import annotations

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform.environment import attention_impl


def packs_as_thd(execution: ExecutionConfig) -> bool:
    """Packed rows reach attention as THD ``PackedSeqParams`` exactly when the resolved core
    attention is Transformer Engine's. Any other core attention gets the block-diagonal mask:
    Megatron's own ``DotProductAttention`` (``execution.attention: megatron_local``) asserts
    ``packed_seq_params is None`` (megatron-core 0.16.1 ``transformer/dot_product_attention.py``
    line 153), and the SDPA attention takes a mask, also beside the TE layer spec."""
    return attention_impl(execution) == "transformer_engine"
