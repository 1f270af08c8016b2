"""Sequence packing: several pairs in one row, attention confined to each sequence.

``collate_packed`` lays a packed micro-batch (``data/batching.py``, policy ``packed``) out as one
row ``[1, T]``: ``c0 r0 c1 r1 ...`` back to back, each sequence padded to
``segment_multiple``, the row to ``pad_to_multiple_of``. ``segment_ids[0, t]`` is the index of
the sequence token ``t`` belongs to in interleaved order (chosen of pair ``i`` = ``2i``,
rejected = ``2i + 1``; ``-1`` = padding), so per-sequence sums come out as ``[2B]`` exactly as
an unpacked ``[2B, S]`` micro-batch gives them (``logprobs.sequence_logprobs``).

The model sees the packing one of two ways:

- Transformer Engine (GPU): Megatron's packed-sequence path, ``PackedSeqParams(qkv_format=
  "thd", cu_seqlens_q/kv, cu_seqlens_q/kv_padded, max_seqlen_q/kv)`` built from
  ``cu_seqlens`` / ``cu_seqlens_padded`` / ``max_seqlen`` here. RoPE restarts at 0 in every
  sequence there (``rope_utils._apply_rotary_pos_emb_thd``).
- The local spec (CPU, GPUs without TE): ``block_causal_mask`` (Megatron's convention: bool,
  True = masked out, ``[b, 1, s, s]``) passed as ``GPTModel``'s ``attention_mask``, with the
  layer spec's mask type ``arbitrary`` so no kernel substitutes its own causal mask. Positions
  are not reset: RoPE rotates query and key at positions ``m`` and ``n`` so that their score
  depends on ``m - n`` only; with attention confined to one sequence, a sequence starting at
  offset ``o`` sees exactly the relative positions it has alone (equal up to fp32 rounding of
  the rotation angles, measured in the packed == unpacked tests).

Padding rules (the THD format's, encoded in ``tests/unit/test_packing.py``): with context
parallelism every sequence's padded length is a multiple of ``2 * CP`` (Megatron-Core 0.16.1
``utils.get_thd_batch_on_this_cp_rank`` and ``rope_utils._apply_rotary_pos_emb_thd`` split each
sequence into ``2 * CP`` chunks, as Transformer Engine's ``thd_get_partitioned_indices``
does); the row length is a multiple of the layout's ``pad_multiple`` (sequence parallelism
splits the row over TP). The row's tail padding counts as padding of its last sequence
(``cu_seqlens_padded[-1] == T``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron_adadpo.data.batching import round_up
from megatron_adadpo.data.collate import pair_ids, pair_sequences

# Per-token tensors of a packed micro-batch (split along the sequence for context parallelism).


def collate_packed(
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
    segment_multiple: int = 1,
) -> dict[str, Any]:
    """Pack B pairs into one row.

    - ``labels[0, t] = tokens[0, t + 1]``; ``loss_mask`` is 1 exactly on completion tokens
      (as ``collate_pairs``), so no loss crosses a sequence boundary.
    - ``cu_seqlens`` = ``[0, l0, l0 + l1, ...]`` (real lengths), ``cu_seqlens_padded`` the
      offsets of the padded sequences (last entry ``T``), ``max_seqlen`` the longest padded
      sequence (a Python int, as Megatron's rotary length needs one without a device sync),
      ``pad_between_seqs`` whether any sequence is padded, the row's tail included (a Python
      bool: ``cu_seqlens != cu_seqlens_padded`` anywhere, known here without a device sync),
      ``tail_tokens`` the row's padding after its last padded sequence (a Python int).

    Shapes:
        tokens, labels, position_ids, segment_ids: int64 ``[1, T]`` (per token).
        loss_mask: float32 ``[1, T]``.
        pair_ids: int64 ``[B]``; cu_seqlens, cu_seqlens_padded: int32 ``[2B + 1]``;
        real_tokens: int64 ``[]`` (non-padding tokens).

    Example (pad 0; pairs ``[1, 10 | 20, 2]`` / ``[1, 10 | 30, 2]``, prompt length 2):

    >>> ex = {"chosen_ids": [1, 10, 20, 2], "rejected_ids": [1, 10, 30, 2],
    ...       "prompt_length": 2, "pair_id": 5}
    >>> b = collate_packed([ex], pad_token_id=0, pad_to_multiple_of=4, segment_multiple=1)
    >>> b["tokens"], b["segment_ids"]
    (tensor([[ 1, 10, 20,  2,  1, 10, 30,  2]]), tensor([[0, 0, 0, 0, 1, 1, 1, 1]]))
    >>> b["loss_mask"]
    tensor([[0., 1., 1., 0., 0., 1., 1., 0.]])
    >>> b["cu_seqlens"], b["cu_seqlens_padded"], b["max_seqlen"], b["pad_between_seqs"]
    (tensor([0, 4, 8], dtype=torch.int32), tensor([0, 4, 8], dtype=torch.int32), 4, False)
    """
    sequences, prompt_lengths = pair_sequences(examples)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    padded = round_up(lengths, segment_multiple)
    starts = np.concatenate([[0], np.cumsum(padded)])
    total = int(round_up(int(starts[-1]), pad_to_multiple_of))
    tokens = np.full(total, pad_token_id, dtype=np.int64)
    loss_mask = np.zeros(total, dtype=np.float32)
    segment_ids = np.full(total, -1, dtype=np.int64)
    for k, (ids, p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        start = int(starts[k])
        tokens[start : start + len(ids)] = ids
        loss_mask[start + p - 1 : start + len(ids) - 1] = 1.0  # labels[t] = ids[t + 1]
        segment_ids[start : start + len(ids)] = k
    labels = np.full(total, pad_token_id, dtype=np.int64)
    labels[:-1] = tokens[1:]
    tail = total - int(starts[-1])
    padded[-1] += tail  # the row's tail pads the last sequence
    cu_padded = np.concatenate([[0], np.cumsum(padded)])
    return {
        "tokens": torch.from_numpy(tokens)[None],
        "labels": torch.from_numpy(labels)[None],
        "loss_mask": torch.from_numpy(loss_mask)[None],
        "position_ids": torch.arange(total, dtype=torch.int64)[None],
        "segment_ids": torch.from_numpy(segment_ids)[None],
        "pair_ids": pair_ids(examples),
        "real_tokens": torch.tensor(int(lengths.sum())),
        "cu_seqlens": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).int(),
        "cu_seqlens_padded": torch.from_numpy(cu_padded).int(),
        "max_seqlen": int(padded.max()),
        "pad_between_seqs": bool((padded != lengths).any()),
        "tail_tokens": tail,
    }


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask confining each token to the earlier tokens of its own sequence.

    ``masked[b, 0, i, j] = not (segment_ids[b, i] == segment_ids[b, j] and j <= i)``: Megatron's
    convention (bool, True = masked out), for ``GPTModel(attention_mask=...)`` with a layer spec
    of mask type ``arbitrary`` / ``padding`` (and torch SDPA as ``~mask``). Padding (id -1)
    attends to earlier padding only, so no row is fully masked.

    Shapes: segment_ids ``[b, s]`` -> ``[b, 1, s, s]`` bool.
    """
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal)[:, None]
