"""TRL 1.16.0 as the oracle of the per-token statistics: its chunked LM head
(``trl.kernels.chunked_logprob.ChunkedLogProbFunction``, what ``DPOTrainer`` computes
``entropy``, ``is_top1`` -> ``mean_token_accuracy`` and WPO's ``log_sum_sq_probs`` with) on the
same hidden states and output weight, against this project's chunked output layer at TP2
(vocab-parallel shards, Megatron's padding rows) and the unchunked ``token_stats`` at TP1."""

import pytest
import torch

from megatron_adadpo.chunked_logprobs import OutputLayer, chunked_token_logprobs
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform import distributed as parallel
from megatron_adadpo.token_stats import TOKEN_STATS, vocab_parallel_token_stats
from tests.launcher import run_ranks

trl_kernel = pytest.importorskip(
    "trl.kernels.chunked_logprob", reason="TRL (test-only dependency) is not installed"
)

pytestmark = pytest.mark.distributed

N, H, VOCAB, PADDED = 40, 24, 90, 128  # TP2 shards of 64 rows: the second is partly padding


def _inputs():
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(PADDED, H, generator=g) * 0.6
    labels = torch.randint(0, VOCAB, (N,), generator=g)
    labels[::2] = (hidden @ weight[:VOCAB].t()).argmax(-1)[::2]  # half are arg-max hits
    return hidden, weight, labels


def _trl():
    hidden, weight, labels = _inputs()
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    _, entropy, log_sum_sq, _, top1 = trl_kernel.ChunkedLogProbFunction.apply(
        hidden, weight[:VOCAB], None, labels, 1.0, 16, None, 1.0, outputs
    )
    return {"entropy": entropy, "log_sum_sq_probs": log_sum_sq, "top1": top1.float()}


def _rank(rank, world, chunked):
    import torch.distributed as dist

    groups = parallel.init_model_parallel(ExecutionConfig(tp=world))
    hidden, weight, labels = _inputs()
    shard = weight.chunk(world, 0)[dist.get_rank(groups.tp)]
    if not chunked:
        logits = hidden @ shard.t()
        return vocab_parallel_token_stats(logits, labels, TOKEN_STATS, VOCAB, groups.tp)
    x = hidden.unsqueeze(1)  # [s, b = 1, h]
    _, stats = chunked_token_logprobs(
        x, OutputLayer(shard), labels[None], None, chunk_tokens=7, tp_group=groups.tp,
        vocab_size=VOCAB, stats=TOKEN_STATS,
    )  # fmt: skip
    return {name: value[0] for name, value in stats.items()}


@pytest.mark.parametrize("tp, chunked", [(1, False), (2, False), (2, True)])
def test_equals_trl_chunked_lm_head(tp, chunked):
    want = _trl()
    assert 0 < want["top1"].sum() < N
    for got in run_ranks(_rank, tp, chunked):
        for name in ("entropy", "log_sum_sq_probs"):
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
        assert torch.equal(got["top1"], want["top1"])
