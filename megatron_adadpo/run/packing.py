"""How a packed row reaches Megatron's attention (``data/packing.py`` lays the row out).

- Transformer Engine: ``PackedSeqParams(qkv_format="thd")`` from the row's ``cu_seqlens`` /
  ``cu_seqlens_padded`` / ``max_seqlen`` (``thd_params``, attached once per micro-batch by
  ``run/batches.py``); Megatron turns the causal spec into TE's ``padding_causal`` for THD.
  Whether the row has padding is said, never left to TE (``thd_params``).
- The local spec: ``GPTModel``'s ``attention_mask`` argument, the block-diagonal causal mask
  built on the device from ``segment_ids`` when the step runs (one ``[1, 1, T, T]`` bool tensor
  per micro-batch in flight, not per step).
- Unpacked rows: no mask (Megatron's causal mask; right padding is never attended to).
"""

from __future__ import annotations

import torch

from megatron_adadpo.data.packing import block_causal_mask
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform.environment import attention_impl
from megatron_adadpo.platform.megatron import PACKED_SEQ_TAKES_PAD_FLAG, PackedSeqParams


def packs_as_thd(execution: ExecutionConfig) -> bool:
    """Packed rows reach attention as THD ``PackedSeqParams`` exactly when the resolved core
    attention is Transformer Engine's. Any other core attention gets the block-diagonal mask:
    Megatron's own ``DotProductAttention`` (``execution.attention: megatron_local``) asserts
    ``packed_seq_params is None`` (megatron-core 0.16.1 ``transformer/dot_product_attention.py``
    line 153), and the SDPA attention takes a mask, also beside the TE layer spec."""
    return attention_impl(execution) == "transformer_engine"


def thd_params(batch: dict) -> PackedSeqParams:
    """Megatron's packed-sequence parameters of a packed micro-batch (THD format): one entry
    per sequence, ``cu_seqlens`` the real and ``cu_seqlens_padded`` the padded boundaries.

    Padding is never left to Transformer Engine to infer: TE <= 2.17 compares
    ``cu_seqlens[:-1]`` with ``cu_seqlens_padded[:-1]``, blind to a padded last sequence / row
    tail, and on that ``False`` its context-parallel ring mislabels the last sequence's chunks
    (TE #3331 / #3332, Megatron-LM #5541) and FlashAttention leaves the padded rows of the
    output and of dQ/dK/dV unwritten (flash-attention #1228, TE PR #3205); the inference also
    syncs the host in every attention call.

    - megatron-core with ``PackedSeqParams.pad_between_seqs`` (0.19): the packing's own flag,
      True when any sequence or the row's tail is padded;
    - megatron-core 0.16.1 (no such field): packed + context parallelism is refused
      (``config._packed_pad_flag_errors``); the row's tail becomes a sequence of its own, so at
      CP = 1 (where sequences are not padded) nothing is padded and the ``False`` TE infers is
      exact: every backend writes every row.
    """
    cu_seqlens, cu_padded = batch["cu_seqlens"], batch["cu_seqlens_padded"]
    flag = {}
    if PACKED_SEQ_TAKES_PAD_FLAG:
        flag = {"pad_between_seqs": batch["pad_between_seqs"]}
    elif batch["tail_tokens"]:
        cu_seqlens, cu_padded = _tail_as_a_sequence(cu_seqlens, cu_padded, batch["tail_tokens"])
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=batch["max_seqlen"],
        max_seqlen_kv=batch["max_seqlen"],
        **flag,
    )


def _tail_as_a_sequence(cu_seqlens, cu_padded, tail: int):
    """``cu_seqlens`` / ``cu_seqlens_padded`` with the row's ``tail`` padding tokens as one more
    (unpadded) sequence, cut off the last sequence's padding. Shapes: ``[n + 1]`` -> ``[n + 2]``
    each (device ops only, no host sync)."""
    end = cu_padded[-1:]
    return (
        torch.cat([cu_seqlens, cu_seqlens[-1:] + tail]),
        torch.cat([cu_padded[:-1], end - tail, end]),
    )


def packed_attention(batch: dict) -> dict:
    """``GPTModel`` keyword arguments confining attention to each sequence of the batch."""
    if "packed_seq_params" in batch:
        return {"attention_mask": None, "packed_seq_params": batch["packed_seq_params"]}
    if "segment_ids" in batch:
        return {"attention_mask": block_causal_mask(batch["segment_ids"])}
    return {"attention_mask": None}
