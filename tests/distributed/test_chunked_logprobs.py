"""``chunked_token_logprobs`` against an fp64 full-vocabulary reference written here: per-token
log-probs, logit sums, entropy, arg-max hit, ``log sum_v p_v^2`` and the gradients of the hidden
states and the weight, at TP1, TP2 and TP2 + sequence parallel, padded vocabulary, chunk sizes
that do and do not divide the token count; and Megatron DDP's main-grad contract for the weight
gradient."""

import pytest
import torch

from megatron_adadpo.chunked_logprobs import OutputLayer, chunked_token_logprobs
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.platform import distributed as parallel
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

S, B, H = 12, 4, 16
VOCAB, PADDED = 50, 64  # TP2 shards of 32 columns: the second one is partly padding
STATS = ("logit_sum", "entropy", "top1", "log_sum_sq_probs")


def _inputs():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    weight = torch.randn(PADDED, H, generator=g, dtype=torch.float64) * 0.7
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    top = torch.einsum("sbh,vh->bsv", hidden, weight[:VOCAB]).argmax(-1)
    labels[:, ::3] = top[:, ::3]  # a third of the labels are the arg-max (token accuracy)
    mask = (torch.rand(B, S, generator=g) > 0.3).double()
    labels[mask == 0] = -100  # prompt / padding positions carry ignore markers
    upstream = torch.randn(B, S, generator=g, dtype=torch.float64)  # d objective / d log p
    return hidden, weight, labels, mask, upstream


def _reference():
    """fp64, the whole vocabulary at once, padding rows left out of the softmax."""
    hidden, weight, labels, mask, upstream = _inputs()
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logits = torch.einsum("sbh,vh->bsv", x, w[:VOCAB])
    logp_all = torch.log_softmax(logits, -1)
    logps = logp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    (logps * upstream * mask).sum().backward()
    p = logp_all.detach().exp()
    stats = {
        "logit_sum": logits.detach().sum(-1),
        "entropy": -(p * logp_all.detach()).sum(-1),
        "top1": (logits.detach().argmax(-1) == labels).double(),
        "log_sum_sq_probs": p.square().sum(-1).log(),
    }
    return logps.detach(), stats, x.grad, w.grad


def _rank(rank, world, sequence_parallel, chunk, use_mask):
    import torch.distributed as dist

    groups = parallel.init_model_parallel(
        ExecutionConfig(tp=world, sequence_parallel=sequence_parallel)
    )
    hidden, weight, labels, mask, upstream = _inputs()
    tp_rank = dist.get_rank(groups.tp)
    x = hidden.float()
    if sequence_parallel:
        x = x.chunk(world, dim=0)[tp_rank]
    x = x.clone().requires_grad_()
    w = weight.float().chunk(world, dim=0)[tp_rank].clone().requires_grad_()
    layer = OutputLayer(w, sequence_parallel)
    kwargs = dict(chunk_tokens=chunk, tp_group=groups.tp, vocab_size=VOCAB)
    keep = mask if use_mask else None
    logps, stats = chunked_token_logprobs(x, layer, labels, keep, **kwargs, stats=STATS)
    (logps * upstream.float() * mask.float()).sum().backward()
    dist.all_reduce(stats["logit_sum"], group=groups.tp)  # shard sums -> full-vocabulary sums
    with torch.no_grad():  # the reference model's forward
        forward_only = chunked_token_logprobs(x, layer, labels, keep, **kwargs)
    return logps.detach(), stats, x.grad, w.grad, forward_only, forward_only.grad_fn


@pytest.mark.parametrize(
    "tp, sequence_parallel, chunk, use_mask",
    [
        (1, False, 5, True),  # does not divide the masked token count
        (1, False, 8, False),  # divides S * B = 48
        (2, False, 7, True),
        (2, True, 6, False),  # divides 48; sequence all-gathered / grads reduce-scattered
        (2, True, 1000, True),  # one chunk holds every token
    ],
)
def test_matches_full_vocab_fp64(tp, sequence_parallel, chunk, use_mask):
    ref_logps, ref_stats, ref_dx, ref_dw = _reference()
    _, _, _, mask, _ = _inputs()
    m = mask.bool()
    hits = ref_stats["top1"][m]
    assert 0 < hits.sum() < hits.numel()  # both outcomes occur: the comparison can fail
    for rank, result in enumerate(run_ranks(_rank, tp, sequence_parallel, chunk, use_mask)):
        logps, stats, dx, dw, forward_only, grad_fn = result
        torch.testing.assert_close(logps.double()[m], ref_logps[m], atol=2e-6, rtol=0)
        tolerances = {"logit_sum": 1e-4, "entropy": 2e-6, "top1": 0, "log_sum_sq_probs": 2e-6}
        for name, atol in tolerances.items():
            got, want = stats[name].double()[m], ref_stats[name][m]
            torch.testing.assert_close(got, want, atol=atol, rtol=1e-6, msg=name)
            if use_mask:
                assert not stats[name][~m].any(), name  # no logits outside the mask
        if use_mask:  # tokens outside the mask get no logits
            assert torch.equal(logps[~m], torch.zeros_like(logps[~m]))
        assert torch.equal(forward_only, logps) and grad_fn is None
        dx_ref = ref_dx.chunk(tp, dim=0)[rank] if sequence_parallel else ref_dx
        torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dw.double(), ref_dw.chunk(tp, dim=0)[rank], atol=1e-5, rtol=1e-5)
        padding = dw[max(VOCAB - rank * (PADDED // tp), 0) :]  # this shard's TP padding rows
        assert torch.equal(padding, torch.zeros_like(padding))
    assert ref_dw[VOCAB:].abs().max() == 0  # the padding rows: no gradient in the reference


def _main_grad_rank(rank, world, dtype, zero_out_wgrad):
    from megatron_adadpo import chunked_logprobs

    chunked_logprobs.WGRAD_BLOCK_BYTES = 5 * H * 2  # bf16 dW in blocks of 5 vocabulary rows
    groups = parallel.init_model_parallel(ExecutionConfig())
    hidden, weight, labels, mask, upstream = _inputs()
    w = weight.to(dtype).requires_grad_()
    w.main_grad = torch.full(w.shape, 0.5)  # Megatron DDP's fp32 grad buffer, already in use
    w.grad_added_to_main_grad = False
    if zero_out_wgrad:
        w.zero_out_wgrad = True
    logps = chunked_token_logprobs(
        hidden.to(dtype), OutputLayer(w), labels, mask, chunk_tokens=9, tp_group=groups.tp,
        vocab_size=VOCAB,
    )  # fmt: skip
    (logps * upstream.float() * mask.float()).sum().backward()
    dummy = w.grad.clone() if zero_out_wgrad else None
    return w.main_grad - 0.5, w.grad_added_to_main_grad, dummy


@pytest.mark.parametrize(
    "dtype, zero_out_wgrad, tol",
    [(torch.float32, False, 1e-5), (torch.float32, True, 1e-5), (torch.bfloat16, False, 3e-2)],
)
def test_weight_gradient_goes_to_ddp_main_grad(dtype, zero_out_wgrad, tol):
    """As ``ColumnParallelLinear`` with gradient-accumulation fusion (megatron-core 0.16.1
    ``tensor_parallel/layers.py``): ``dW`` added to ``main_grad``, ``grad_added_to_main_grad``
    set so DDP's hook does not add ``.grad`` again, and a zero ``.grad`` when the weight is
    shared with the embedding on one stage (``zero_out_wgrad``: DDP's hook adds ``.grad``)."""
    _, _, _, dw_ref = _reference()
    added, flag, dummy = run_ranks(_main_grad_rank, 1, dtype, zero_out_wgrad)[0]
    err = (added.double() - dw_ref).norm() / dw_ref.norm()
    assert err <= tol and flag is True
    if zero_out_wgrad:
        assert torch.equal(dummy, torch.zeros_like(dummy))


def test_bad_arguments_are_refused():
    layer = OutputLayer(torch.zeros(8, 4))
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden must be \[s, b, h\]"):
        chunked_token_logprobs(torch.zeros(2, 3, 4), layer, labels, None, chunk_tokens=2,
                               tp_group=None)  # fmt: skip
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_token_logprobs(torch.zeros(3, 2, 4), layer, labels, None, chunk_tokens=0,
                               tp_group=None)  # fmt: skip
