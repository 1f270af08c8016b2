"""``pad_between_seqs``: whether a packed row has padding is said to Transformer Engine, never
left to its inference (rules of Megatron-Core and TE that only a GPU with TE runs, encoded here):

- TE <= 2.17 infers the flag as ``not equal(cu_seqlens_padded[:-1], cu_seqlens[:-1])``
  (``dot_product_attention.py`` @ v2.16 lines 1519-1529, TE #3331): blind to a padded last
  sequence / row tail. On that False its context-parallel ring mislabels the last sequence's
  chunks (TE #3331 / #3332, Megatron-LM #5541) and FlashAttention leaves the tail rows of the
  output and of dQ/dK/dV unwritten (flash-attention #1228, TE PR #3205).
- megatron-core 0.19.2 ``PackedSeqParams.pad_between_seqs`` (``packed_seq_params.py`` line 28),
  forwarded to TE >= 2.2 by ``TEDotProductAttention`` (``extensions/transformer_engine.py``
  lines 1920 and 1944-1945): set from the packing, True when any entry of ``cu_seqlens``
  differs from ``cu_seqlens_padded``, the last one included.
- megatron-core 0.16.1 (no such field): packed + CP refused; at CP = 1 the row's tail becomes
  a sequence of its own, so no sequence is padded and TE's inferred False is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import megatron_adadpo.run.microbatch as microbatch
from megatron_adadpo.data.packing import collate_packed
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform.hardware import Machine
from megatron_adadpo.platform.machine import probe_machine
from megatron_adadpo.platform.megatron import (
    MEGATRON_VERSION,
    PACKED_SEQ_TAKES_PAD_FLAG,
    PackedSeqParams,
)
from megatron_adadpo.resolve.kernels import kernel_errors
from megatron_adadpo.run.microbatch import MicroBatch


def _pair(chosen: int, rejected: int, pair_id: int = 0) -> dict:
    """A pair with a 2-token prompt: rows of ``chosen`` and ``rejected`` tokens."""
    ids = np.arange(3, 3 + max(chosen, rejected))
    return {
        "chosen_ids": ids[:chosen],
        "rejected_ids": ids[:rejected] + 1,
        "prompt_length": 2,
        "pair_id": pair_id,
    }


def _te_inferred(batch: dict) -> bool:
    """TE <= 2.17's own inference (v2.16 ``dot_product_attention.py`` lines 1519-1529)."""
    return not torch.equal(batch["cu_seqlens_padded"][:-1], batch["cu_seqlens"][:-1])


# (pairs, row multiple, segment multiple, padded anywhere)
CASES = {
    "no_padding": ([_pair(4, 4)], 1, 1, False),
    "only_the_row_tail": ([_pair(4, 5)], 4, 1, True),  # 9 tokens -> 12: TE infers False
    "between_sequences": ([_pair(5, 4)], 1, 4, True),  # CP 2: each sequence to 4
    "only_the_last_sequence": ([_pair(4, 5)], 1, 4, True),  # CP 2: 4 | 5 -> 8: TE infers False
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_packing_says_whether_any_sequence_or_the_tail_is_padded(case):
    pairs, row_multiple, segment_multiple, padded = CASES[case]
    batch = collate_packed(pairs, 0, row_multiple, segment_multiple)
    reference = not torch.equal(batch["cu_seqlens"], batch["cu_seqlens_padded"])
    assert batch["pad_between_seqs"] is reference is padded
    if case.startswith("only_"):  # the cases TE's own inference gets wrong
        assert not _te_inferred(batch)


def test_the_seam_knows_which_megatron_core_takes_the_flag():
    fields = {f.name for f in dataclasses.fields(PackedSeqParams)}
    assert PACKED_SEQ_TAKES_PAD_FLAG is ("pad_between_seqs" in fields)
    major_minor = tuple(int(x) for x in MEGATRON_VERSION.split(".")[:2])
    assert PACKED_SEQ_TAKES_PAD_FLAG is (major_minor >= (0, 19))


@pytest.mark.skipif(not PACKED_SEQ_TAKES_PAD_FLAG, reason="megatron-core without the field")
@pytest.mark.parametrize("case", sorted(CASES))
def test_thd_params_pass_the_packings_flag(case):
    pairs, row_multiple, segment_multiple, padded = CASES[case]
    batch = collate_packed(pairs, 0, row_multiple, segment_multiple)
    params = microbatch.thd_params(MicroBatch.from_collated(batch, "thd").packed)
    assert params.pad_between_seqs is padded
    assert torch.equal(params.cu_seqlens_q, batch["cu_seqlens"])
    assert torch.equal(params.cu_seqlens_q_padded, batch["cu_seqlens_padded"])


def test_without_the_field_the_tail_is_a_sequence_of_its_own(monkeypatch):
    """The 0.16.1 branch (also run on 0.19.2, where PackedSeqParams takes the same call): at
    CP = 1 no sequence is padded after it, so TE's inferred False is the truth, and every row
    of the buffer lies in a sequence (the last boundary is the row's length)."""
    monkeypatch.setattr(microbatch, "PACKED_SEQ_TAKES_PAD_FLAG", False)
    for case in ("no_padding", "only_the_row_tail"):
        pairs, row_multiple, segment_multiple, _ = CASES[case]
        batch = collate_packed(pairs, 0, row_multiple, segment_multiple)
        params = microbatch.thd_params(MicroBatch.from_collated(batch, "thd").packed)
        assert torch.equal(params.cu_seqlens_q, params.cu_seqlens_q_padded)
        assert torch.equal(params.cu_seqlens_kv, params.cu_seqlens_kv_padded)
        assert int(params.cu_seqlens_q_padded[-1]) == batch["tokens"].shape[-1]
        assert getattr(params, "pad_between_seqs", None) is None  # nothing passed
        real = params.cu_seqlens_q.diff()
        assert int(real.max()) <= params.max_seqlen_q
    assert params.cu_seqlens_q.tolist() == [0, 4, 9, 12]  # chosen | rejected | tail


def test_packed_context_parallel_refused_where_the_flag_cannot_be_passed():
    """The resolver's rule on a TE GPU machine whose megatron-core cannot pass the flag."""
    gpu = {"has_cuda": True, "has_te": True, "compute_capability": (9, 0)}
    old = Machine(**gpu, megatron_core="0.16.1", packed_pad_flag=False)
    new = Machine(**gpu, megatron_core="0.19.2", packed_pad_flag=True)
    cp2 = ExecutionConfig(cp=2, bf16=True)
    (error,) = kernel_errors(cp2, old, "packed")
    assert "pad_between_seqs" in error and "data.batching=token_budget" in error
    assert "0.16.1" in error
    assert kernel_errors(cp2, new, "packed") == []
    assert kernel_errors(ExecutionConfig(bf16=True), old, "packed") == []  # CP = 1
    assert kernel_errors(cp2, old, "token_budget") == []  # not packed
    sdpa = ExecutionConfig(cp=2, bf16=True, attention="sdpa")
    assert all("pad_between_seqs" not in e for e in kernel_errors(sdpa, old, "packed"))


def test_the_probe_says_what_this_megatron_core_can_pass():
    machine = probe_machine()
    assert machine.packed_pad_flag is PACKED_SEQ_TAKES_PAD_FLAG
    assert machine.megatron_core == MEGATRON_VERSION
