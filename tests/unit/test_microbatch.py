"""``MicroBatch`` (``run/microbatch.py``): the one conversion of collate's output, its
context-parallel split, device move and attention inputs.

References are independent of the code under test: the CP split is written here as slices of
``2 CP`` equal chunks (rank ``r`` keeps chunks ``r`` and ``2 CP - 1 - r``: megatron-core 0.16.1
``utils.get_batch_on_this_cp_rank``; per padded sequence for a packed row, as TE's
``thd_get_partitioned_indices``), the packed mask as a loop over token pairs, the THD
parameters from the collated boundaries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_adadpo.data import collate_pairs
from megatron_adadpo.data.packing import collate_packed
from megatron_adadpo.platform.megatron import PACKED_SEQ_TAKES_PAD_FLAG, PackedSeqParams
from megatron_adadpo.run.microbatch import MicroBatch

PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids")


def _examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt, chosen, rejected = (int(x) for x in rng.integers(2, 12, 3))
        ids = rng.integers(3, 200, prompt + chosen + rejected)
        out.append(
            {
                "chosen_ids": ids[: prompt + chosen],
                "rejected_ids": np.concatenate([ids[:prompt], ids[prompt + chosen :]]),
                "prompt_length": prompt,
                "pair_id": 10 + i,
            }
        )
    return out


def _zigzag_slices(tensor: torch.Tensor, start: int, length: int, rank: int, cp: int):
    """Rank ``rank``'s two chunks of ``tensor[:, start : start + length]`` (independent)."""
    chunk = length // (2 * cp)
    first = start + rank * chunk
    second = start + (2 * cp - 1 - rank) * chunk
    return [tensor[:, first : first + chunk], tensor[:, second : second + chunk]]


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_split_of_rows_keeps_chunks_r_and_2cp_minus_1_minus_r(cp):
    rows = collate_pairs(_examples(3, seed=cp), 0, pad_to_multiple_of=2 * cp)
    batch = MicroBatch.from_collated(rows)
    batch.reference_logps = torch.randn(6, dtype=torch.float32)
    seq = rows["tokens"].shape[1]
    assert seq % (2 * cp) == 0 and seq > 2 * cp
    for rank in range(cp):
        share = batch.on_cp_rank(rank, cp)
        for name in PER_TOKEN:
            want = torch.cat(_zigzag_slices(rows[name], 0, seq, rank, cp), dim=1)
            assert torch.equal(getattr(share, name), want), (rank, name)
        assert share.sequence_length == seq and share.cp_size == cp
        assert torch.equal(share.pair_ids, rows["pair_ids"])  # per pair: whole
        assert torch.equal(share.real_tokens, rows["real_tokens"])
        assert share.reference_logps is batch.reference_logps
        assert share.packed is None and share.attention_inputs() == {"attention_mask": None}
    with pytest.raises(ValueError, match="already a share of CP = 2"):
        batch.on_cp_rank(0, 2).on_cp_rank(0, 2)
    assert batch.on_cp_rank(0, 1) is batch


def test_cp_split_of_a_packed_row_splits_every_padded_sequence():
    cp = 2
    rows = collate_packed(_examples(3, seed=5), 0, pad_to_multiple_of=8, segment_multiple=2 * cp)
    batch = MicroBatch.from_collated(rows, "thd")
    bounds = rows["cu_seqlens_padded"].tolist()
    for rank in range(cp):
        share = batch.on_cp_rank(rank, cp)
        for name in (*PER_TOKEN, "segment_ids"):
            parts = []
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                parts += _zigzag_slices(rows[name], start, end - start, rank, cp)
            got = share.segment_ids if name == "segment_ids" else getattr(share, name)
            assert torch.equal(got, torch.cat(parts, dim=1)), (rank, name)
        # THD attention wants the whole row's boundaries on every CP rank
        assert torch.equal(share.packed.cu_seqlens, rows["cu_seqlens"])
        assert torch.equal(share.packed.cu_seqlens_padded, rows["cu_seqlens_padded"])
        assert share.packed.max_seqlen == rows["max_seqlen"]
        assert share.sequence_length == rows["tokens"].shape[1]


def test_device_move_moves_every_tensor_and_keeps_host_ints():
    rows = collate_packed(_examples(2, seed=1), 0, pad_to_multiple_of=4)
    batch = MicroBatch.from_collated(rows, "mask")
    batch.reference_logps = torch.zeros(4)
    meta = torch.device("meta")
    moved = batch.to(meta)
    tensors = {n: getattr(moved, n) for n in (*PER_TOKEN, "pair_ids", "real_tokens")}
    tensors["reference_logps"] = moved.reference_logps
    for name in ("segment_ids", "cu_seqlens", "cu_seqlens_padded"):
        tensors[name] = getattr(moved.packed, name)
    for name, tensor in tensors.items():
        assert tensor.device == meta, name
        source = rows.get(name, batch.reference_logps)
        assert tensor.dtype == source.dtype and tensor.shape == source.shape, name
    assert moved.packed.max_seqlen == rows["max_seqlen"] and moved.packed.attention == "mask"
    assert batch.tokens.device.type == "cpu"  # a new value; the original is untouched


def test_attention_inputs_unpacked_mask_and_thd():
    examples = _examples(2, seed=3)
    unpacked = MicroBatch.from_collated(collate_pairs(examples, 0))
    assert unpacked.attention_inputs() == {"attention_mask": None}  # Megatron's causal mask
    assert unpacked.segment_ids is None and unpacked.num_sequences == 4

    rows = collate_packed(examples, 0, pad_to_multiple_of=8)
    masked = MicroBatch.from_collated(rows, "mask").attention_inputs()
    assert set(masked) == {"attention_mask"}
    segments = rows["segment_ids"][0].tolist()
    mask = masked["attention_mask"]
    assert mask.shape == (1, 1, len(segments), len(segments)) and mask.dtype == torch.bool
    for i, j in np.ndindex(len(segments), len(segments)):
        allowed = j <= i and segments[i] == segments[j]  # True in the mask = masked out
        assert bool(mask[0, 0, i, j]) == (not allowed), (i, j)

    thd = MicroBatch.from_collated(rows, "thd").attention_inputs()
    assert thd["attention_mask"] is None
    params = thd["packed_seq_params"]
    assert isinstance(params, PackedSeqParams) and params.qkv_format == "thd"
    real, padded = rows["cu_seqlens"], rows["cu_seqlens_padded"]
    if not PACKED_SEQ_TAKES_PAD_FLAG and rows["tail_tokens"]:  # 0.16.1: the tail is a sequence
        total = rows["tokens"].shape[1]
        real = torch.cat([real, real[-1:] + rows["tail_tokens"]])
        padded = torch.cat([padded[:-1], padded[-1:] - rows["tail_tokens"], padded.new([total])])
    for side in ("q", "kv"):
        assert torch.equal(getattr(params, f"cu_seqlens_{side}"), real)
        assert torch.equal(getattr(params, f"cu_seqlens_{side}_padded"), padded)
        assert getattr(params, f"max_seqlen_{side}") == rows["max_seqlen"]
