"""Vocab-parallel log-probs vs a full-vocab fp64 log_softmax; CP split vs CP = 1; the
vocab-parallel mean logit (TRL's ``logits/*`` metrics) vs a full-vocabulary mean."""

import pytest
import torch

import megatron_adadpo.logprobs as logprobs_module
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.logprobs import (
    sequence_logprobs,
    sequence_mean_logits,
    shard_logit_sums,
    token_logprobs,
)
from megatron_adadpo.platform import distributed as parallel
from megatron_adadpo.platform.megatron import parallel_state
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

S, B, V = 12, 3, 64


def _inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    labels[mask == 0] = -100  # prompt / padding positions carry ignore markers
    weights = torch.randn(B, S, generator=g, dtype=torch.float64)
    return logits, labels, mask, weights


def _tp_rank(rank, world, tp):
    tp_group = parallel.init_model_parallel(ExecutionConfig(tp=tp)).tp
    logits, labels, mask, weights = _inputs()
    shard = logits.float().chunk(tp, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]
    shard = shard.clone().requires_grad_(True)
    before = shard.detach().clone()
    logps = token_logprobs(shard, labels, tp_group)
    sums, counts = sequence_logprobs(logps, mask)
    (sums * weights.sum(1).float()).sum().backward()
    # per-token values and gradient through a weighted per-token objective
    shard2 = shard.detach().clone().requires_grad_(True)
    (token_logprobs(shard2, labels, tp_group) * weights.float() * mask).sum().backward()
    unchanged = torch.equal(shard.detach(), before)
    return logps.detach(), sums.detach(), counts, shard2.grad, shard.grad, unchanged


def _reference():
    logits, labels, mask, weights = _inputs()
    full = logits.clone().requires_grad_(True)
    logp_all = torch.log_softmax(full, dim=-1)  # [s, b, v]
    logps = logp_all.gather(-1, labels.clamp(min=0).t().unsqueeze(-1)).squeeze(-1).t()  # [b, s]
    (logps * weights * mask).sum().backward()
    sums = (logps * mask).sum(-1)
    full2 = logits.clone().requires_grad_(True)
    lp2 = torch.log_softmax(full2, -1).gather(-1, labels.clamp(min=0).t().unsqueeze(-1))
    ((lp2.squeeze(-1).t() * mask).sum(-1) * weights.sum(1)).sum().backward()
    return logps.detach(), sums.detach(), mask.sum(-1), full.grad, full2.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_matches_full_vocab_fp64(tp):
    ref_logps, ref_sums, ref_counts, ref_grad, ref_grad2 = _reference()
    _, _, mask, _ = _inputs()
    results = run_ranks(_tp_rank, tp, tp)
    for rank, (logps, sums, counts, grad, grad_seq, unchanged) in enumerate(results):
        assert unchanged, "token_logprobs modified the caller's logits"
        m = mask.bool()
        torch.testing.assert_close(logps.double()[m], ref_logps[m], atol=2e-6, rtol=0)
        torch.testing.assert_close(sums.double(), ref_sums, atol=1e-5, rtol=0)
        assert torch.equal(counts, ref_counts.float())
        shard_ref = ref_grad.chunk(tp, dim=-1)[rank]
        torch.testing.assert_close(grad.double(), shard_ref, atol=2e-6, rtol=0)
        torch.testing.assert_close(
            grad_seq.double(), ref_grad2.chunk(tp, dim=-1)[rank], atol=1e-5, rtol=0
        )


def _masked_rank(rank, world):
    tp_group = parallel.init_model_parallel(ExecutionConfig()).tp
    logits, labels, mask, _ = _inputs()
    logps = token_logprobs(logits.float(), labels, tp_group)
    poisoned = logps.clone()
    poisoned[mask == 0] = float("nan")
    sums, counts = sequence_logprobs(poisoned, mask)
    expected = torch.where(mask > 0, logps, 0).sum(-1)
    assert torch.equal(sums, expected)
    assert torch.isfinite(sums).all()
    grad_in = poisoned.clone().requires_grad_(True)
    sequence_logprobs(grad_in, mask)[0].sum().backward()
    assert torch.equal(grad_in.grad, mask)  # exactly 1 on completion tokens, 0 elsewhere


def test_masked_positions_contribute_exactly_zero():
    run_ranks(_masked_rank, 1)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[s, b, v/tp\]"):
        token_logprobs(torch.zeros(4, 2, 8), torch.zeros(4, 2, dtype=torch.long), None)


def _cp_rank(rank, world, cp):
    """Each CP rank holds chunks (r, 2cp-1-r) of the sequence, as Megatron's CP load balancing."""
    parallel.init_model_parallel(ExecutionConfig(cp=1))  # groups built by hand below
    group = torch.distributed.new_group(list(range(cp)))
    logits, labels, mask, weights = _inputs()
    token = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).t().unsqueeze(-1))
    token = token.squeeze(-1).t().contiguous()  # [b, s]
    idx = torch.tensor_split(torch.arange(S), 2 * cp)
    mine = torch.cat([idx[rank], idx[2 * cp - 1 - rank]])
    local = token[:, mine].clone().requires_grad_(True)
    sums, counts = sequence_logprobs(local, mask[:, mine], cp_group=group)
    loss = (torch.sigmoid(sums) * weights.sum(1).float()).sum()  # non-linear in the sums
    loss.backward()
    return sums.detach(), counts, mine, local.grad


def test_context_parallel_sums_and_gradients_match_cp1():
    logits, labels, mask, weights = _inputs()
    token = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).t().unsqueeze(-1))
    token = token.squeeze(-1).t().contiguous().requires_grad_(True)
    sums, counts = sequence_logprobs(token, mask)
    (torch.sigmoid(sums) * weights.sum(1).float()).sum().backward()
    cp = 2
    for cp_sums, cp_counts, mine, grad in run_ranks(_cp_rank, cp, cp):
        torch.testing.assert_close(cp_sums, sums.detach(), atol=1e-5, rtol=1e-6)
        assert torch.equal(cp_counts, counts)
        # backward all-reduces: each CP rank holds cp x the CP=1 gradient of its positions,
        # which Megatron's normaliser (pairs counted on every CP rank) divides back out.
        torch.testing.assert_close(grad, cp * token.grad[:, mine], atol=1e-6, rtol=0)


def _padded_rank(rank, world, vocab_size):
    tp_group = parallel.init_model_parallel(ExecutionConfig(tp=world)).tp
    logits, labels, mask, _ = _inputs()
    labels = labels.clamp(max=vocab_size - 1)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shard = logits.float().chunk(world, dim=-1)[tp_rank].clone().requires_grad_(True)
    logps = token_logprobs(shard, labels, tp_group, vocab_size=vocab_size)
    (logps * mask).sum().backward()
    return logps.detach(), shard.grad


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_padding_rows_leave_the_softmax(tp):
    """Columns >= vocab_size (Megatron's TP padding) get no probability and no gradient."""
    vocab_size = 27  # the second TP shard (32..63) is padding only, the first is partly
    logits, labels, mask, _ = _inputs()
    labels = labels.clamp(max=vocab_size - 1)
    full = logits[..., :vocab_size].clone().requires_grad_(True)
    ref = torch.log_softmax(full, -1).gather(-1, labels.clamp(min=0).t().unsqueeze(-1))
    ref = ref.squeeze(-1).t()
    (ref * mask).sum().backward()
    for rank, (logps, grad) in enumerate(run_ranks(_padded_rank, tp, vocab_size)):
        m = mask.bool()
        torch.testing.assert_close(logps.double()[m], ref.detach()[m], atol=2e-6, rtol=0)
        full_grad = torch.nn.functional.pad(full.grad, (0, V - vocab_size))
        torch.testing.assert_close(grad.double(), full_grad.chunk(tp, -1)[rank], atol=2e-6, rtol=0)


def _mean_logit_rank(rank, world, vocab_size, chunk):
    tp_group = parallel.init_model_parallel(ExecutionConfig(tp=world)).tp
    logits, _, mask, _ = _inputs()
    logits[..., vocab_size:] = 1e4  # Megatron's TP padding columns: must not count
    shard = logits.float().chunk(world, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]
    whole = shard_logit_sums(shard, vocab_size, tp_group)  # [s, b], no communication
    logprobs_module._UPCAST_ELEMENTS = 7  # fp32 upcast one token at a time (forked rank only)
    # a chunked output layer: the same per-token sums, one [c, b, v/tp] slice at a time
    chunks = [shard_logit_sums(c, vocab_size, tp_group) for c in shard.split(chunk)]
    chunks = torch.cat(chunks, dim=0)
    sums, counts = sequence_mean_logits(whole.t(), mask, vocab_size, tp_group)
    chunked_sums, _ = sequence_mean_logits(chunks.t(), mask, vocab_size, tp_group)
    return sums, counts, chunked_sums


@pytest.mark.parametrize("tp", [2, 4])
def test_mean_logit_is_vocab_parallel_and_excludes_padding(tp):
    """TP2: shard 1 is half padding; TP4 (vocab 40 of 64): rank 3 holds only padding."""
    vocab_size = 40
    logits, _, mask, _ = _inputs()
    mean_logit = logits[..., :vocab_size].mean(-1).t()  # [b, s], full vocabulary, fp64
    ref_sums = (mean_logit * mask).sum(-1)
    for sums, counts, chunked in run_ranks(_mean_logit_rank, tp, vocab_size, 5):
        torch.testing.assert_close(sums.double(), ref_sums, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(chunked, sums, atol=1e-6, rtol=0)
        assert torch.equal(counts, mask.sum(-1).float())
    # TRL's logits/chosen over a batch: the token-weighted mean
    assert float(ref_sums.sum() / mask.sum()) == pytest.approx(
        float(mean_logit[mask.bool()].mean()), rel=1e-12
    )
