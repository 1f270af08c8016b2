"""One micro-batch of the step as a typed value: what the model, the loss and the reference read.

``data/`` collates examples into plain tensors (``data.collate_pairs``: ``2B`` rows;
``data.packing.collate_packed``: one packed row); ``MicroBatch.from_collated`` converts that once,
and everything in ``run/`` reads fields. Whether the rows are packed, and how a packed row
reaches attention, are fields (``packed`` and its ``attention``), not the presence of keys.

The micro-batch does the three things only it knows how to do:

- ``on_cp_rank``: the context-parallel share of a rank (``run/context_parallel.py``): the zigzag
  positions of the whole row, or of each sequence of a packed row; per-token tensors are cut to
  ``[b, S/CP]``, per-pair values stay whole (sums are reduced over CP), and the whole length
  ``S`` is kept for Megatron's p2p buffer shapes (``sequence_length``).
- ``to``: every tensor on the training device (``max_seqlen`` stays a host int).
- ``attention_inputs``: ``GPTModel``'s ``attention_mask`` / ``packed_seq_params``: nothing for
  unpacked rows (Megatron's causal mask; right padding is never attended to), THD
  ``PackedSeqParams`` for a packed row on Transformer Engine attention (Megatron turns the
  causal spec into TE's ``padding_causal`` for THD), or the block-diagonal causal mask built on
  the device from ``segment_ids`` (every other core attention; one ``[1, 1, T, T]`` bool tensor
  per micro-batch in flight, not per step; ``resolve/batching.packing_format`` decides which).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from megatron_adadpo.data.packing import block_causal_mask
from megatron_adadpo.platform.megatron import PACKED_SEQ_TAKES_PAD_FLAG, PackedSeqParams
from megatron_adadpo.run.context_parallel import thd_partition_index, zigzag_positions

PackedAttention = Literal["thd", "mask"]


@dataclass(frozen=True)
class PackedRows:
    """The sequences of a packed row (``data/packing.py``).

    Shapes: segment_ids int64 ``[1, T]`` (per token; ``-1`` padding), cu_seqlens and
    cu_seqlens_padded int32 ``[2B + 1]`` (real / padded sequence boundaries of the whole row,
    also on a CP rank, as THD attention wants them).
    """

    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int  # the longest padded sequence (a host int: no device sync for RoPE)
    attention: PackedAttention  # THD PackedSeqParams (TE attention) or a block-diagonal mask
    pad_between_seqs: bool = False  # any sequence or the row's tail is padded (host bool)
    tail_tokens: int = 0  # padding after the last sequence's padded end (host int)


@dataclass
class MicroBatch:
    """``2B`` rows ``[c0, r0, c1, r1, ...]`` (or one packed row holding them) and their pairs.

    Shapes:
        tokens, labels, position_ids: int64 ``[b, S]`` per token (``b = 2B``, or 1 packed);
        loss_mask: float32 ``[b, S]`` (1 on completion tokens); ``S/CP`` on a CP rank.
        pair_ids: int64 ``[B]``; real_tokens: int64 ``[]`` (non-padding tokens of the rows).
        reference_logps: fp32 ``[2B]`` per sequence, attached by ``run/reference.py``.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    pair_ids: torch.Tensor
    real_tokens: torch.Tensor
    packed: PackedRows | None = None
    reference_logps: torch.Tensor | None = None
    cp_size: int = 1  # the tokens are one CP rank's share of ``cp_size``

    @classmethod
    def from_collated(cls, batch: dict, packing: PackedAttention | None = None) -> MicroBatch:
        """The micro-batch of ``collate_pairs``' rows (``packing`` None) or of
        ``collate_packed``'s row, reaching attention as ``packing`` (``"thd"`` / ``"mask"``)."""
        packed = None
        if packing is not None:
            packed = PackedRows(
                batch["segment_ids"],
                batch["cu_seqlens"],
                batch["cu_seqlens_padded"],
                batch["max_seqlen"],
                packing,
                batch["pad_between_seqs"],
                batch["tail_tokens"],
            )
        names = ("tokens", "labels", "loss_mask", "position_ids", "pair_ids", "real_tokens")
        return cls(**{name: batch[name] for name in names}, packed=packed)

    @property
    def segment_ids(self) -> torch.Tensor | None:
        """Each token's sequence index in a packed row (None: one sequence per row)."""
        return None if self.packed is None else self.packed.segment_ids

    @property
    def num_sequences(self) -> int:
        """``2B``: the chosen and rejected sequence of every pair."""
        return 2 * self.pair_ids.numel()

    @property
    def sequence_length(self) -> int:
        """The whole sequence length ``S`` (also on a CP rank holding ``S/CP`` of it)."""
        return self.tokens.shape[1] * self.cp_size

    def on_cp_rank(self, cp_rank: int, cp_size: int) -> MicroBatch:
        """This CP rank's share: per-token ``[b, S]`` -> ``[b, S/CP]`` zigzag positions (of the
        whole row; of each padded sequence of a packed row); per-pair values and a packed row's
        boundaries unchanged. ``cp_size == 1``: the micro-batch itself."""
        if cp_size == 1:
            return self
        if self.cp_size != 1:
            raise ValueError(f"the micro-batch is already a share of CP = {self.cp_size}")
        if self.packed is None:
            keep = zigzag_positions(self.tokens.shape[1], cp_rank, cp_size)
        else:
            keep = thd_partition_index(self.packed.cu_seqlens_padded, cp_size, cp_rank)
        keep = keep.to(self.tokens.device)

        def cut(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.index_select(1, keep)

        packed = None
        if self.packed is not None:
            packed = replace(self.packed, segment_ids=cut(self.packed.segment_ids))
        per_token = {name: cut(getattr(self, name)) for name in _PER_TOKEN}
        return replace(self, **per_token, packed=packed, cp_size=cp_size)

    def to(self, device: torch.device) -> MicroBatch:
        """Every tensor on ``device`` (a packed row's ``max_seqlen`` stays a host int)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        packed = self.packed
        if packed is not None:
            tensors = ("segment_ids", "cu_seqlens", "cu_seqlens_padded")
            packed = replace(packed, **{n: getattr(packed, n).to(device) for n in tensors})
        return replace(self, **moved, packed=packed)

    def attention_inputs(self) -> dict:
        """``GPTModel`` keyword arguments confining attention to each sequence of the rows."""
        packed = self.packed
        if packed is None:
            return {"attention_mask": None}
        if packed.attention == "mask":
            return {"attention_mask": block_causal_mask(packed.segment_ids)}
        return {"attention_mask": None, "packed_seq_params": thd_params(packed)}


_PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids")


def thd_params(packed: PackedRows) -> PackedSeqParams:
    """Megatron's packed-sequence parameters of a packed row (THD format): one entry per
    sequence, ``cu_seqlens`` the real and ``cu_seqlens_padded`` the padded boundaries.

    Padding is never left to Transformer Engine to infer: TE <= 2.17 compares
    ``cu_seqlens[:-1]`` with ``cu_seqlens_padded[:-1]``, blind to a padded last sequence / row
    tail, and on that ``False`` its context-parallel ring mislabels the last sequence's chunks
    (TE #3331 / #3332, Megatron-LM #5541) and FlashAttention leaves the padded rows of the
    output and of dQ/dK/dV unwritten (flash-attention #1228, TE PR #3205); the inference also
    syncs the host in every attention call.

    - megatron-core with ``PackedSeqParams.pad_between_seqs`` (0.19): the packing's own flag,
      True when any sequence or the row's tail is padded;
    - megatron-core 0.16.1 (no such field): packed + context parallelism is refused
      (``resolve/kernels._packed_pad_flag_errors``); the row's tail becomes a sequence of its
      own, so at CP = 1 (where sequences are not padded) nothing is padded and the ``False`` TE
      infers is exact: every backend writes every row.
    """
    cu_seqlens, cu_padded = packed.cu_seqlens, packed.cu_seqlens_padded
    flag = {}
    if PACKED_SEQ_TAKES_PAD_FLAG:
        flag = {"pad_between_seqs": packed.pad_between_seqs}
    elif packed.tail_tokens:
        cu_seqlens, cu_padded = _tail_as_a_sequence(cu_seqlens, cu_padded, packed.tail_tokens)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=packed.max_seqlen,
        max_seqlen_kv=packed.max_seqlen,
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
