"""Collate preference pairs into the tensors one Megatron forward step needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron_adadpo.layout import pad_multiple  # noqa: F401 (re-exported by the data API)


def collate_pairs(
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Stack B pairs into an interleaved `[2B, S]` micro-batch, right-padded.

    Layout: rows are `[c0, r0, c1, r1, ...]` (chosen of pair i at row 2i, rejected at 2i+1),
    so a pair is never split and per-pair scores are `x[0::2] - x[1::2]`.

    - `labels[:, t] = tokens[:, t + 1]`; the last position and padding get `pad_token_id`.
    - `loss_mask[:, t] = 1.0` exactly where `labels[:, t]` is a completion token (the answer's
      tokens and its EOS); 0.0 for prompt tokens (BOS included) and padding.
    - No attention mask (the step passes None): padding is on the right, so with Megatron's
      causal mask (`AttnMaskType.causal`, local and TE attention) no real token attends to a
      pad, and pad positions carry no loss.
    - `S` = longest row rounded up to `pad_to_multiple_of` (see `pad_multiple`); pipelines
      exchange each micro-batch's shape (`variable_seq_lengths`), so no fixed length is needed.

    Shapes:
        tokens, labels, position_ids: int64 `[2B, S]` (per token).
        loss_mask: float32 `[2B, S]` (per token); `loss_mask.sum(1)` = completion lengths.
        pair_ids: int64 `[B]` (per pair).
        real_tokens: int64 `[]`, the non-padding tokens (throughput metrics).

    Example (pad id 0, BOS 1, EOS 2; prompt [1, 10, 11], chosen answer [20], rejected [30, 31]):

    >>> ex = {"chosen_ids": [1, 10, 11, 20, 2], "rejected_ids": [1, 10, 11, 30, 31, 2],
    ...       "prompt_length": 3, "pair_id": 7}
    >>> b = collate_pairs([ex], pad_token_id=0, pad_to_multiple_of=4)
    >>> b["tokens"]
    tensor([[ 1, 10, 11, 20,  2,  0,  0,  0],
            [ 1, 10, 11, 30, 31,  2,  0,  0]])
    >>> b["labels"]
    tensor([[10, 11, 20,  2,  0,  0,  0,  0],
            [10, 11, 30, 31,  2,  0,  0,  0]])
    >>> b["loss_mask"]
    tensor([[0., 0., 1., 1., 0., 0., 0., 0.],
            [0., 0., 1., 1., 1., 0., 0., 0.]])
    >>> b["position_ids"][0]
    tensor([0, 1, 2, 3, 4, 5, 6, 7])
    >>> b["loss_mask"].sum(1), b["pair_ids"], b["real_tokens"]
    (tensor([2., 3.]), tensor([7]), tensor(11))
    >>> sorted(b)
    ['labels', 'loss_mask', 'pair_ids', 'position_ids', 'real_tokens', 'tokens']
    """
    rows, prompt_lengths = pair_sequences(examples)
    seq = -(-max(len(r) for r in rows) // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    tokens = np.full((n, seq), pad_token_id, dtype=np.int64)
    loss_mask = np.zeros((n, seq), dtype=np.float32)
    for i, (ids, p) in enumerate(zip(rows, prompt_lengths, strict=True)):
        tokens[i, : len(ids)] = ids
        loss_mask[i, p - 1 : len(ids) - 1] = 1.0  # labels[t] = ids[t + 1] is a completion token
    labels = np.full((n, seq), pad_token_id, dtype=np.int64)
    labels[:, :-1] = tokens[:, 1:]
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(n, seq).clone(),
        "pair_ids": pair_ids(examples),
        "real_tokens": torch.tensor(sum(len(r) for r in rows)),
    }


def pair_sequences(examples: Sequence[dict[str, Any]]) -> tuple[list[np.ndarray], list[int]]:
    """The pairs' sequences in interleaved order ``[c0, r0, c1, r1, ...]`` (int64 token ids)
    and each one's prompt length; refuses a sequence without a prompt or a completion."""
    if not examples:
        raise ValueError("a micro-batch needs at least one pair")
    rows: list[np.ndarray] = []
    prompt_lengths: list[int] = []
    for ex in examples:
        p = int(ex["prompt_length"])
        for key in ("chosen_ids", "rejected_ids"):
            ids = np.asarray(ex[key], dtype=np.int64)
            if not 0 < p < len(ids):
                raise ValueError(
                    f"pair {ex.get('pair_id')}: {key} has {len(ids)} tokens and prompt_length "
                    f"{p}; a sequence needs a prompt and at least one completion token"
                )
            rows.append(ids)
            prompt_lengths.append(p)
    return rows, prompt_lengths


def pair_ids(examples: Sequence[dict[str, Any]]) -> torch.Tensor:
    """int64 ``[B]``: the stable id of each pair, in collate order."""
    return torch.tensor([int(ex["pair_id"]) for ex in examples], dtype=torch.int64)
