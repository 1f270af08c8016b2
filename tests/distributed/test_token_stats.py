"""``vocab_parallel_token_stats`` against an fp64 full-vocabulary reference written here:
entropy ``-sum p log p``, ``log sum p^2`` and the arg-max hit (ties to the lowest index, TRL's
``is_top1``), at TP1, TP2 and TP4, with Megatron's TP padding columns (TP4: a rank holding only
padding), exact ties within and across shards, token blocks of every size, and bf16 logits."""

import pytest
import torch

import megatron_adadpo.logprobs as logprobs_module
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform import distributed as parallel
from megatron_adadpo.platform.megatron import parallel_state
from megatron_adadpo.token_stats import TOKEN_STATS, vocab_parallel_token_stats
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

S, B, V = 10, 3, 64


def _inputs(vocab_size):
    """Logits ``[s, b, V]`` fp64 and labels ``[s, b]``; token rows 0..3 hold planted ties."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 2
    logits[..., vocab_size:] = 50.0  # TP padding columns: never the max, never in the softmax
    labels = torch.randint(0, vocab_size, (S, B), generator=g)
    labels[4:] = logits[4:, :, :vocab_size].argmax(-1)  # hits away from the ties
    labels[6:, 0] = (labels[6:, 0] + 1) % vocab_size  # and misses
    top = logits[..., :vocab_size].amax(-1) + 1
    for s, (first, second, label) in enumerate([(3, 35, 35), (3, 35, 3), (2, 9, 9), (2, 9, 2)]):
        logits[s, :, first] = top[s]  # equal maxima: across TP2 shards (rows 0, 1),
        logits[s, :, second] = top[s]  # within shard 0 (rows 2, 3)
        labels[s] = label  # the lower index wins: rows 1 and 3 hit, rows 0 and 2 miss
    return logits, labels


def _reference(vocab_size):
    logits, labels = _inputs(vocab_size)
    z = logits[..., :vocab_size]
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    columns = torch.arange(vocab_size, dtype=torch.float64)
    first_max = torch.where(z == z.amax(-1, keepdim=True), columns, torch.inf).amin(-1)
    return {
        "entropy": -(p * logp).sum(-1),
        "log_sum_sq_probs": (p * p).sum(-1).log(),
        "top1": (first_max == labels).double(),
    }


def _rank(rank, world, vocab_size, block_elements, dtype):
    if block_elements:
        logprobs_module._UPCAST_ELEMENTS = block_elements  # forked rank only
    parallel.init_model_parallel(ExecutionConfig(tp=world))
    logits, labels = _inputs(vocab_size)
    shard = logits.to(dtype).chunk(world, -1)[parallel_state.get_tensor_model_parallel_rank()]
    before = shard.clone()
    stats = vocab_parallel_token_stats(shard, labels, TOKEN_STATS, vocab_size)
    assert torch.equal(shard, before)  # the caller's logits are untouched
    return stats


@pytest.mark.parametrize(
    "tp, vocab_size, block_elements",
    [
        (1, V, 0),  # one block
        (1, 50, 7 * 50),  # 7 tokens per block: not a divisor of 30
        (2, 50, 0),  # shard 1 is partly padding
        (2, V, 1),  # one token per block
        (4, 40, 0),  # rank 3 holds only padding columns
    ],
)
def test_matches_full_vocab_fp64(tp, vocab_size, block_elements):
    ref = _reference(vocab_size)
    assert ref["top1"][:4, 0].tolist() == [0.0, 1.0, 0.0, 1.0]  # the planted ties
    assert 0 < ref["top1"].sum() < ref["top1"].numel()
    for stats in run_ranks(_rank, tp, vocab_size, block_elements, torch.float32):
        assert set(stats) == set(TOKEN_STATS)
        for name in ("entropy", "log_sum_sq_probs"):
            torch.testing.assert_close(stats[name].double(), ref[name], atol=2e-6, rtol=1e-6)
        assert torch.equal(stats["top1"].double(), ref["top1"])


def test_bf16_logits_are_read_in_fp32():
    """bf16 logits: the statistics of the bf16 values, computed in fp32 (no bf16 arithmetic)."""
    logits, _ = _inputs(V)
    ref_logits = logits.to(torch.bfloat16).double()
    logp = torch.log_softmax(ref_logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    stats = run_ranks(_rank, 2, V, 0, torch.bfloat16)[0]
    torch.testing.assert_close(stats["entropy"].double(), entropy, atol=2e-5, rtol=1e-5)


def test_unknown_statistic_is_refused():
    with pytest.raises(ValueError, match="unknown token statistics"):
        vocab_parallel_token_stats(torch.zeros(2, 4), torch.zeros(2), ("perplexity",))
