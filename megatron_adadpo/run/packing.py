"""How a packed row reaches Megatron's attention (``data/packing.py`` lays the row out; the
resolved run's ``batching.packing`` says which way: ``resolve/batching.packing_format``).

- Transformer Engine: ``PackedSeqParams(qkv_format="thd")`` from the row's ``cu_seqlens`` /
  ``cu_seqlens_padded`` / ``max_seqlen`` (``thd_params``, attached once per micro-batch by
  ``run/batches.py``); Megatron turns the causal spec into TE's ``padding_causal`` for THD.
- The local spec: ``GPTModel``'s ``attention_mask`` argument, the block-diagonal causal mask
  built on the device from ``segment_ids`` when the step runs (one ``[1, 1, T, T]`` bool tensor
  per micro-batch in flight, not per step).
- Unpacked rows: no mask (Megatron's causal mask; right padding is never attended to).
"""

from __future__ import annotations

from megatron_adadpo.data.packing import block_causal_mask
from megatron_adadpo.platform.megatron import PackedSeqParams


def thd_params(batch: dict) -> PackedSeqParams:
    """Megatron's packed-sequence parameters of a packed micro-batch (THD format): one entry
    per sequence, ``cu_seqlens`` the real and ``cu_seqlens_padded`` the padded boundaries."""
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=batch["cu_seqlens"],
        cu_seqlens_kv=batch["cu_seqlens"],
        cu_seqlens_q_padded=batch["cu_seqlens_padded"],
        cu_seqlens_kv_padded=batch["cu_seqlens_padded"],
        max_seqlen_q=batch["max_seqlen"],
        max_seqlen_kv=batch["max_seqlen"],
    )


def packed_attention(batch: dict) -> dict:
    """``GPTModel`` keyword arguments confining attention to each sequence of the batch."""
    if "packed_seq_params" in batch:
        return {"attention_mask": None, "packed_seq_params": batch["packed_seq_params"]}
    if "segment_ids" in batch:
        return {"attention_mask": block_causal_mask(batch["segment_ids"])}
    return {"attention_mask": None}
