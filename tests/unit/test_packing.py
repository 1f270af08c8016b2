"""Sequence packing (``data/packing.py``, ``run/microbatch.py``): the row layout, the block-diagonal
causal mask, the THD rules Transformer Engine relies on (rule-tested: TE cannot run here), the
per-segment sums, and a packed forward equal to the unpacked one on a real ``GPTModel``."""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pytest
import torch

import megatron_adadpo.data.packing as packing_module
from megatron_adadpo.data import collate_pairs
from megatron_adadpo.data.packing import block_causal_mask, collate_packed
from megatron_adadpo.logprobs import sequence_logprobs
from megatron_adadpo.model.config import RopeScaling
from megatron_adadpo.run.context_parallel import thd_partition_index
from megatron_adadpo.run.microbatch import MicroBatch
from tests.launcher import run_ranks


def _pair(prompt: int, chosen: int, rejected: int, pair_id: int, rng) -> dict:
    ids = rng.integers(3, 200, prompt + chosen + rejected)
    return {
        "chosen_ids": ids[: prompt + chosen],
        "rejected_ids": np.concatenate([ids[:prompt], ids[prompt + chosen :]]),
        "prompt_length": prompt,
        "pair_id": pair_id,
    }


def test_docstring_example_runs():
    result = doctest.testmod(packing_module, verbose=False)
    assert result.attempted >= 3 and result.failed == 0


def test_row_layout_written_by_hand():
    ex = {"chosen_ids": [1, 10, 11, 20, 2], "rejected_ids": [1, 10, 11, 30, 31, 2]}
    b = collate_packed([{**ex, "prompt_length": 3, "pair_id": 4}], 0, 8, segment_multiple=4)
    t = torch.tensor
    assert torch.equal(b["tokens"], t([[1, 10, 11, 20, 2, 0, 0, 0, 1, 10, 11, 30, 31, 2, 0, 0]]))
    assert torch.equal(b["labels"][0, :-1], b["tokens"][0, 1:]) and b["labels"][0, -1] == 0
    assert torch.equal(b["segment_ids"], t([[0, 0, 0, 0, 0, -1, -1, -1, 1, 1, 1, 1, 1, 1, -1, -1]]))
    mask = t([[0.0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]])
    assert torch.equal(b["loss_mask"], mask)  # labels 20, 2 | 30, 31, 2
    assert b["cu_seqlens"].tolist() == [0, 5, 11] and b["cu_seqlens"].dtype == torch.int32
    assert b["cu_seqlens_padded"].tolist() == [0, 8, 16] and b["max_seqlen"] == 8
    assert b["real_tokens"] == 11 and b["pair_ids"].tolist() == [4]


def test_block_causal_mask_matches_a_loop():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 3, -1, -1]])
    mask = block_causal_mask(segments)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b, i, j in np.ndindex(2, 6, 6):
        allowed = j <= i and segments[b, i] == segments[b, j]
        assert bool(mask[b, 0, i, j]) == (not allowed)
    assert not mask.all(-1).any()  # every query (padding included) attends to something


@pytest.mark.parametrize("cp, tp_sp", [(1, 1), (1, 2), (2, 1), (4, 2)])
def test_thd_parameters_follow_the_segment_boundaries_and_te_padding_rules(cp, tp_sp):
    """The rule Megatron's THD path relies on (megatron-core 0.16.1): ``PackedSeqParams``
    (``packed_seq_params.py``) with ``cu_seqlens_q/kv`` = the real sequence boundaries and
    ``cu_seqlens_q/kv_padded`` = the padded ones; with context parallelism every padded sequence
    length is a multiple of ``2 * CP`` (``rope_utils._apply_rotary_pos_emb_thd`` divides each by
    CP and ``_get_thd_freqs_on_this_cp_rank`` halves it; ``utils.get_thd_batch_on_this_cp_rank``
    splits with TE's ``thd_get_partitioned_indices``); the row length ``T`` is a multiple of the
    layout's pad multiple (sequence parallelism scatters ``T / CP`` over TP); ``max_seqlen`` sizes
    the rotary table (``get_rotary_seq_len``) so it must cover the longest padded sequence.
    On a megatron-core that cannot pass ``pad_between_seqs`` (0.16.1) a padded row tail at
    CP = 1 is a sequence of its own (``run/microbatch.thd_params``; ``test_packed_pad_flag.py``)."""
    from megatron_adadpo.layout import pad_multiple
    from megatron_adadpo.platform.megatron import PACKED_SEQ_TAKES_PAD_FLAG

    rng = np.random.default_rng(cp * 10 + tp_sp)
    examples = [_pair(*rng.integers(1, 40, 3), pair_id=i, rng=rng) for i in range(5)]
    multiple = pad_multiple(tp_sp, cp, tp_sp > 1)
    batch = collate_packed(examples, 0, multiple, segment_multiple=2 * cp if cp > 1 else 1)
    inputs = MicroBatch.from_collated(batch, "thd").attention_inputs()
    params = inputs["packed_seq_params"]
    assert inputs["attention_mask"] is None
    real = [len(e[k]) for e in examples for k in ("chosen_ids", "rejected_ids")]
    segments = batch["segment_ids"][0]
    assert params.qkv_format == "thd"
    assert torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv)
    total = batch["tokens"].shape[1]
    cu_real, cu_padded = params.cu_seqlens_q.tolist(), params.cu_seqlens_q_padded.tolist()
    if len(cu_real) == len(real) + 2:  # the row's tail as a sequence of its own
        tail = batch["tail_tokens"]
        assert not PACKED_SEQ_TAKES_PAD_FLAG and tail > 0
        assert cu_real[-1] - cu_real[-2] == cu_padded[-1] - cu_padded[-2] == tail
        assert cp > 1 or cu_real == cu_padded  # nothing padded at CP = 1
        cu_real, cu_padded = cu_real[:-1], cu_padded[:-2] + [total]
    assert np.diff(cu_real).tolist() == real
    padded = np.diff(cu_padded)
    starts = cu_padded[:-1]
    for k, (start, length) in enumerate(zip(starts, real, strict=True)):
        assert (segments[start : start + length] == k).all()  # sequence k starts where THD says
    assert (padded >= real).all()
    assert cp == 1 or (padded % (2 * cp) == 0).all()
    assert cu_padded[-1] == total and total % multiple == 0
    assert params.max_seqlen_q == params.max_seqlen_kv == padded.max()


def _megatron_cp_split(rank, world, cu_padded):
    """This CP rank's token indices by Megatron's split, applied sequence by sequence (the
    world is the CP group: megatron-core 0.19 asks torch.distributed for the rank)."""
    from megatron_adadpo.platform.megatron import get_batch_on_this_cp_rank

    group = torch.distributed.group.WORLD
    parts = [
        get_batch_on_this_cp_rank({"x": torch.arange(start, end)[None]}, group)["x"][0]
        for start, end in zip(cu_padded[:-1], cu_padded[1:], strict=True)
    ]
    return torch.cat(parts)


def test_thd_context_parallel_split_is_megatrons_split_per_sequence():
    """TE's ``thd_get_partitioned_indices`` gives each CP rank chunks ``r`` and ``2CP - 1 - r``
    of every padded sequence: Megatron's load-balanced ``get_batch_on_this_cp_rank`` (0.16.1
    ``utils.py``) applied sequence by sequence is the independent reference."""
    rng = np.random.default_rng(0)
    examples = [_pair(*rng.integers(1, 30, 3), pair_id=i, rng=rng) for i in range(4)]
    batch = collate_packed(examples, 0, pad_to_multiple_of=8, segment_multiple=8)
    cu_padded = batch["cu_seqlens_padded"].tolist()
    expected = run_ranks(_megatron_cp_split, 4, cu_padded)
    for rank in range(4):
        assert torch.equal(thd_partition_index(batch["cu_seqlens_padded"], 4, rank), expected[rank])
        shard = MicroBatch.from_collated(batch, "thd").on_cp_rank(rank, 4)
        assert torch.equal(shard.tokens[0], batch["tokens"][0, expected[rank]])
        assert torch.equal(shard.segment_ids[0], batch["segment_ids"][0, expected[rank]])
        assert torch.equal(shard.packed.cu_seqlens, batch["cu_seqlens"])  # stay global
    with pytest.raises(ValueError, match="not a multiple of 2 x CP = 8"):
        thd_partition_index(torch.tensor([0, 4, 12]), 4, 0)


def test_segment_sums_equal_row_sums_of_the_unpacked_layout():
    """Per-sequence sums of a packed row == row sums of ``[2B, S]`` (fp64), gradient included."""
    rng = np.random.default_rng(1)
    examples = [_pair(*rng.integers(2, 20, 3), pair_id=i, rng=rng) for i in range(3)]
    unpacked, packed = collate_pairs(examples, 0), collate_packed(examples, 0, 4)
    logps = torch.randn(packed["tokens"].shape, dtype=torch.float64, requires_grad=True)
    rows = torch.zeros(unpacked["tokens"].shape, dtype=torch.float64)
    for k in range(6):  # the same per-token values, laid out as the unpacked rows
        at = packed["segment_ids"][0] == k
        rows[k, : int(at.sum())] = logps[0, at].detach()
    rows.requires_grad_(True)
    sums, counts = sequence_logprobs(
        logps, packed["loss_mask"], segment_ids=packed["segment_ids"], num_sequences=6
    )
    want, want_counts = sequence_logprobs(rows, unpacked["loss_mask"])
    torch.testing.assert_close(sums, want, rtol=0, atol=1e-12)
    assert torch.equal(counts, want_counts)
    sums.sum().backward()
    assert torch.equal(logps.grad[0], packed["loss_mask"][0].double())


def _packed_vs_unpacked(rank, world, filler: int):
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.losses import LossConfig
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.model.initialization import init_layout_invariant
    from megatron_adadpo.platform import distributed as parallel
    from megatron_adadpo.run.sequences import sequence_sums
    from megatron_adadpo.run.step import StepContext, policy_forward
    from tests.megatron_helpers import TINY

    model = dataclasses.replace(
        TINY, rotary_base=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)
    )
    run = ExecutionConfig(transformer_impl="local")
    context = StepContext(LossConfig(), model.vocab_size, parallel.init_model_parallel(run))
    models = {}
    for packed in (True, False):
        (models[packed],) = build_model(model, run, packed_sequences=packed)
        init_layout_invariant([models[packed]], seed=3, vocab_size=model.vocab_size)
    rng = np.random.default_rng(2)
    examples = [_pair(filler, 3, 2, 0, rng)] + [
        _pair(*rng.integers(3, 30, 3), pair_id=i, rng=rng) for i in range(1, 4)
    ]
    packed = MicroBatch.from_collated(collate_packed(examples, 0), "mask")
    unpacked = MicroBatch.from_collated(collate_pairs(examples, 0))
    with torch.no_grad():
        out = {
            "packed": sequence_sums(policy_forward(models[True], packed, context), packed, context),
            "unpacked": sequence_sums(
                policy_forward(models[False], unpacked, context), unpacked, context
            ),
            "unmasked": sequence_sums(  # one causal sequence across the whole row
                models[True](packed.tokens, packed.position_ids, None), packed, context
            ),
        }
    out["mask_types"] = {
        flag: {
            layer.self_attention.core_attention.attn_mask_type.name for layer in m.decoder.layers
        }
        for flag, m in models.items()
    }
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("filler", [4, 900])
def test_packed_forward_equals_unpacked_with_llama3_rope(filler):
    """A tiny GQA ``GPTModel`` with Llama-3 RoPE scaling: per-sequence log-prob sums of a packed
    row equal the unpacked ones; with a 900-token first pair, later sequences sit at offsets
    ~1800 of their row and still agree (RoPE scores depend on relative positions only)."""
    out = run_ranks(_packed_vs_unpacked, 1, filler, timeout=240)[0]
    (sums, counts), (want, want_counts) = out["packed"], out["unpacked"]
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=0)
    assert torch.equal(counts, want_counts)
    leaked = (out["unmasked"][0] - want).abs()[2:]  # later sequences attend to earlier ones
    assert leaked.min() > 1e-2, "the mask must be what confines attention"
    assert out["mask_types"] == {True: {"arbitrary"}, False: {"causal"}}


@pytest.mark.parametrize("mask_type, honours_mask", [("causal", False), ("arbitrary", True)])
def test_megatrons_fused_softmax_ignores_a_mask_under_a_causal_spec(
    monkeypatch, mask_type, honours_mask
):
    """Why packed runs build the local spec with mask type ``arbitrary``: megatron-core 0.16.1
    ``fusions/fused_softmax.py`` ``FusedScaleMaskSoftmax.forward_fused_softmax`` (the CUDA
    kernel path, taken on GPUs with the extension, bf16/fp16, 16 < s <= 4096) applies its own
    upper-triangular mask for ``AttnMaskType.causal`` and never reads the mask passed in; only
    the other types hand the mask to ``ScaledMaskedSoftmax``. The kernels cannot run here, so
    they are replaced by recorders; the dispatch is Megatron's own code."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    seen = []

    def upper_triangular(x, scale):
        seen.append(None)
        return x

    def masked(x, mask, scale):
        seen.append(mask)
        return x

    monkeypatch.setattr(
        fused_softmax.ScaledUpperTriangMaskedSoftmax, "apply", staticmethod(upper_triangular)
    )
    monkeypatch.setattr(fused_softmax.ScaledMaskedSoftmax, "apply", staticmethod(masked))
    monkeypatch.setattr(
        fused_softmax.FusedScaleMaskSoftmax, "get_batch_per_block", staticmethod(lambda *a: 1)
    )
    softmax = fused_softmax.FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=True,
        attn_mask_type=AttnMaskType[mask_type],
        scaled_masked_softmax_fusion=True,
        mask_func=attention_mask_func,
        softmax_in_fp32=True,
        scale=None,
    )
    mask = block_causal_mask(torch.tensor([[0] * 16 + [1] * 16]))
    softmax(torch.zeros(1, 4, 32, 32, dtype=torch.bfloat16), mask)
    assert (seen[0] is mask) == honours_mask
